variable "name" {
  type        = string
  description = "Name of the MSK cluster, e.g. tandem-region1."
}

variable "vpc_id" {
  type        = string
  description = "VPC of the brokers (Region 1)."
}

variable "subnet_ids" {
  type        = list(string)
  description = "Private subnets for the brokers, one per availability zone (2 or 3)."
}

variable "client_cidr_blocks" {
  type        = list(string)
  description = "CIDRs allowed to reach the brokers on the SASL/SCRAM TLS port 9096: the Region 1 VPC and the peered Region 2 VPC. CIDRs, not security groups, because security group references do not cross an inter-region peering."
}

variable "kafka_version" {
  type        = string
  description = "Apache Kafka version of the cluster. The local broker and every test run Apache Kafka 4.1 (deploy/local/kafka/pom.xml); keep the two on one line. An existing ZooKeeper-mode cluster cannot move to KRaft in place: set its version explicitly (docs/deploy.md)."
  default     = "4.1.x.kraft"
}

variable "broker_instance_type" {
  type        = string
  description = "Broker instance type; kafka.t3.small for test accounts, kafka.m7g.large for production."
  default     = "kafka.m7g.large"
}

variable "brokers_per_az" {
  type        = number
  description = "Brokers in each availability zone of subnet_ids."
  default     = 1
}

variable "broker_volume_size_gib" {
  type        = number
  description = "EBS volume per broker in GiB."
  default     = 100
}

variable "scram_users" {
  type        = list(string)
  description = "SASL/SCRAM users to create, one per workload and region that talks to Kafka (relay and consumer-region1 in Region 1, relay-region2 and consumer in Region 2; the first two names predate the second direction) plus admin, the principal that manages the Kafka ACLs. Each gets its own AmazonMSK_ secret and the user name tandem-<user>."
  default     = ["relay", "consumer", "relay-region2", "consumer-region1", "admin"]

  validation {
    condition     = contains(var.scram_users, "admin")
    error_message = "scram_users must contain admin: with allow.everyone.if.no.acl.found=false only an ACL admin can create and change the ACLs."
  }
}

variable "acl_bootstrap" {
  type        = bool
  description = "true only while a new cluster gets its first ACLs: sets allow.everyone.if.no.acl.found=true so the admin user may create them (no principal can create the first ACL on a cluster that denies by default). Apply terraform/deployments/tandem-kafka-acls, then set false and apply again (docs/deploy.md, \"Kafka ACLs\")."
  default     = false
}

variable "max_message_bytes" {
  type        = number
  description = "Largest record batch the brokers accept and replicate (message.max.bytes and replica.fetch.max.bytes); must equal KAFKA_MAX_MESSAGE_BYTES in shared/core/src/limits.rs."

  # A Rust test reads this default and compares it with KAFKA_MAX_MESSAGE_BYTES.
  default = 1048576

  validation {
    condition     = var.max_message_bytes >= 1024 && floor(var.max_message_bytes) == var.max_message_bytes
    error_message = "max_message_bytes must be a whole number of bytes, at least 1024."
  }
}

variable "replica_region" {
  type        = string
  description = "Region that gets read-only replicas of the SCRAM secrets listed in replicated_users (Region 2, where its consumer and relay run and read their secrets through its own VPC endpoint). null: no replicas."
  default     = null
}

variable "replica_kms_key_arn" {
  type        = string
  description = "KMS key in replica_region that encrypts the secret replicas."
  default     = null
}

variable "replicated_users" {
  type        = list(string)
  description = "SCRAM users whose secret is replicated to replica_region."
  default     = ["consumer", "relay-region2"]
}

variable "kms_key_arn" {
  type        = string
  description = "Customer managed KMS key for data at rest, the SCRAM secrets (MSK rejects the AWS managed key) and the broker log group."
}

variable "log_retention_days" {
  type        = number
  description = "Retention of the broker log group in days."
  default     = 365
}

variable "tags" {
  type        = map(string)
  description = "Tags added to every resource of the module."
  default     = {}
}
