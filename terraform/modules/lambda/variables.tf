variable "function_name" {
  type        = string
  description = "Name of the Lambda function, e.g. tandem-region1-write (at most 29 characters: <name>-fn also names its target group)."

  validation {
    condition     = length(var.function_name) <= 29
    error_message = "function_name must be at most 29 characters."
  }
}

variable "description" {
  type        = string
  description = "Description of the function."
}

variable "zip_path" {
  type        = string
  description = "Path of the deployment package built by `cargo lambda build --release --arm64 --output-format zip`, e.g. target/lambda/tandem-write/bootstrap.zip."
}

variable "environment" {
  type        = map(string)
  description = "Environment variables of the function (same names as the EKS workload; no PORT, BIND_ADDRESS or the reserved AWS_REGION)."
}

variable "memory_mb" {
  type        = number
  description = "Memory in MB (CPU scales with it)."
  default     = 512
}

variable "timeout_seconds" {
  type        = number
  description = "Invocation timeout in seconds; keep it under the ALB idle timeout (60 s)."
  default     = 15
}

variable "reserved_concurrency" {
  type        = number
  description = "Reserved concurrent executions: caps how many database connections the function can open through the proxy."
  default     = 100
}

variable "vpc_id" {
  type        = string
  description = "VPC of the function."
}

variable "vpc_cidr_block" {
  type        = string
  description = "CIDR of the VPC (interface endpoints for Secrets Manager, STS, logs)."
}

variable "subnet_ids" {
  type        = list(string)
  description = "Private subnets the function's ENIs are placed in."
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
  description = "Secrets the function may read (the Redis AUTH token secret)."
}

variable "rds_db_user_arns" {
  type        = list(string)
  description = "rds-db:connect resources (the application user on the RDS Proxy)."
}

variable "kms_key_arn" {
  type        = string
  description = "KMS key for the environment variables, the log group and the secrets."
}

variable "log_retention_days" {
  type        = number
  description = "Retention of the function's log group in days."
  default     = 365
}

variable "tags" {
  type        = map(string)
  description = "Tags added to every resource of the module."
  default     = {}
}
