variable "repository_names" {
  type        = list(string)
  description = "ECR repositories to create in the primary region, one per image."
  default     = ["tandem-write", "tandem-read", "tandem-outbox-relay", "tandem-region2-consumer"]
}

variable "kms_key_arn" {
  type        = string
  description = "KMS key (primary region) that encrypts the repositories."
}

variable "replica_kms_key_arn" {
  type        = string
  description = "KMS key in the replica region that encrypts the replicated repositories."
}

variable "untagged_expiry_days" {
  type        = number
  description = "Untagged images (failed or superseded pushes) expire after this many days."
  default     = 14
}

variable "max_tagged_images" {
  type        = number
  description = "Tagged images kept per repository; older ones expire."
  default     = 200
}

variable "tags" {
  type        = map(string)
  description = "Tags added to every resource of the module."
  default     = {}
}
