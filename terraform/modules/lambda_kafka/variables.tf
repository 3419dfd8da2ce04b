variable "function_name" {
  type        = string
  description = "Name of the Lambda function, e.g. tandem-region2-apply (at most 50 characters: <name>-kafka-pollers names its pollers' security group, <name>-discarded its queue)."

  validation {
    condition     = length(var.function_name) <= 50
    error_message = "function_name must be at most 50 characters."
  }
}

variable "description" {
  type        = string
  description = "Description of the function."
}

variable "zip_path" {
  type        = string
  description = "Path of the deployment package built by `cargo lambda build --release --arm64 --output-format zip -p tandem-region2-apply`, e.g. target/lambda/tandem-region2-apply-lambda/bootstrap.zip."
}

variable "environment" {
  type        = map(string)
  description = "Environment variables of the function (no PORT, BIND_ADDRESS or the reserved AWS_REGION)."
}

variable "memory_mb" {
  type        = number
  description = "Memory in MB (CPU scales with it)."
  default     = 512
}

variable "timeout_seconds" {
  type        = number
  description = "Invocation timeout in seconds: a batch's transactions and cache update, well above DATABASE_STATEMENT_TIMEOUT_MS."
  default     = 60
}

variable "reserved_concurrency" {
  type        = number
  description = "Reserved concurrent executions: at least the topic's partition count (the event source invokes at most one batch per partition at a time); caps the connections through the proxy."
  default     = 12
}

variable "vpc_id" {
  type        = string
  description = "VPC of the function and of the event source's pollers."
}

variable "subnet_ids" {
  type        = list(string)
  description = "Private subnets of the function's ENIs and of the pollers' (they must route to the brokers and, through NAT, to AWS APIs)."
}

variable "database_security_group_id" {
  type        = string
  description = "Security group of the RDS Proxy the function connects to on 5432."
}

variable "redis_security_group_id" {
  type        = string
  description = "Security group of the ElastiCache replication group the function connects to on 6379."
}

variable "secret_arns" {
  type        = list(string)
  description = "Secrets the function itself reads (the Redis AUTH token secret)."
}

variable "rds_db_user_arns" {
  type        = list(string)
  description = "rds-db:connect resources (the application user on the RDS Proxy)."
}

variable "kms_key_arn" {
  type        = string
  description = "KMS key of this region: environment variables, log group, the on-failure queue, and the secrets (the SCRAM secret's replica included)."
}

variable "log_retention_days" {
  type        = number
  description = "Retention of the function's log group in days."
  default     = 365
}

variable "kafka_bootstrap_servers" {
  type        = string
  description = "Comma-separated SASL/SCRAM bootstrap brokers (host:port) the event source reads from."
}

variable "kafka_broker_cidr_blocks" {
  type        = list(string)
  description = "Where the brokers are (the VPC CIDR of the MSK cluster): the pollers' egress."
}

variable "kafka_broker_port" {
  type        = number
  description = "Broker port of the SASL/SCRAM listener."
  default     = 9096
}

variable "kafka_topic" {
  type        = string
  description = "Kafka topic of the document events (KAFKA_TOPIC)."
}

variable "kafka_consumer_group" {
  type        = string
  description = "Consumer group of the event source: the consumer pod's KAFKA_GROUP_ID, so a switch from the pod starts at the positions the pod committed. Fixed once the mapping exists."
}

variable "kafka_scram_secret_arn" {
  type        = string
  description = "ARN (in this region) of the Secrets Manager secret {\"username\",\"password\"} of the SCRAM user the event source authenticates as."
}

variable "event_source_enabled" {
  type        = bool
  description = "Whether the event source mapping polls (false pauses Region 2's apply; the lag then grows and Region 2's /readyz fails past its threshold)."
  default     = true
}

variable "batch_size" {
  type        = number
  description = "Most records per invocation (a batch is also cut at 6 MB of event); the consumer pod applies up to 500 per transaction."
  default     = 500

  validation {
    condition     = var.batch_size >= 1 && var.batch_size <= 10000
    error_message = "batch_size must be between 1 and 10000."
  }
}

variable "maximum_batching_window_seconds" {
  type        = number
  description = "How long the event source gathers records before invoking; 0 keeps the Kafka default of 500 ms, the shortest there is (any other value is whole seconds and adds to Region 2's lag)."
  default     = 0

  validation {
    condition     = var.maximum_batching_window_seconds >= 0 && var.maximum_batching_window_seconds <= 300
    error_message = "maximum_batching_window_seconds must be between 0 and 300."
  }
}

variable "maximum_retry_attempts" {
  type        = number
  description = "Retries of a batch (or of the records the function reported) before the event source gives up and describes it in the on-failure queue. The function only reports transient database failures, so this is how long an outage Region 2 rides through without losing events: with an on-failure destination, -1 (forever) would mean 10."
  default     = 10000

  validation {
    condition     = var.maximum_retry_attempts >= 0 && var.maximum_retry_attempts <= 10000
    error_message = "maximum_retry_attempts must be between 0 and 10000."
  }
}

variable "minimum_pollers" {
  type        = number
  description = "Provisioned mode: event pollers always running (each billed per hour; one reads about 5 MB/s)."
  default     = 1
}

variable "maximum_pollers" {
  type        = number
  description = "Provisioned mode: most event pollers the mapping scales to."
  default     = 3
}

variable "tags" {
  type        = map(string)
  description = "Tags added to every resource of the module."
  default     = {}
}
