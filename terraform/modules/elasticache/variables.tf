variable "name" {
  type        = string
  description = "Replication group ID prefix, e.g. tandem-region1."
}

variable "vpc_id" {
  type        = string
  description = "VPC of the cache."
}

variable "subnet_ids" {
  type        = list(string)
  description = "Private subnets of the cache subnet group."
}

variable "allowed_security_group_ids" {
  type        = map(string)
  description = "Security groups allowed to connect on 6379, keyed by a static name (eks, write, read). A map so the keys are known at plan time."
}

variable "engine_version" {
  type        = string
  description = "Redis OSS engine version."
  default     = "7.1"
}

variable "node_type" {
  type        = string
  description = "Cache node type, e.g. cache.t4g.small for test accounts, cache.m7g.large for production."
  default     = "cache.m7g.large"
}

variable "num_cache_clusters" {
  type        = number
  description = "Nodes in the replication group (1 primary + replicas, at least 2: automatic failover and Multi-AZ are always on)."
  default     = 2

  validation {
    condition     = var.num_cache_clusters >= 2
    error_message = "num_cache_clusters must be at least 2 (automatic failover needs a replica)."
  }
}

variable "snapshot_retention_days" {
  type        = number
  description = "Days of automatic snapshots. The cache can be rebuilt from PostgreSQL, so a short retention is enough."
  default     = 1
}

variable "kms_key_arn" {
  type        = string
  description = "KMS key for data at rest, the AUTH token secret and the slow-log group."
}

variable "log_retention_days" {
  type        = number
  description = "Retention of the slow-log group in days."
  default     = 365
}

variable "tags" {
  type        = map(string)
  description = "Tags added to every resource of the module."
  default     = {}
}
