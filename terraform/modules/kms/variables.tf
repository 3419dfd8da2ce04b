variable "name" {
  type        = string
  description = "Name prefix for the key and its alias, e.g. tandem-region1."
}

variable "description" {
  type        = string
  description = "Human-readable description stored on the key."
  default     = "Tandem data key: RDS, ElastiCache, MSK, Secrets Manager, CloudWatch Logs, EKS secrets, ECR, Lambda environment."
}

variable "deletion_window_in_days" {
  type        = number
  description = "Waiting period before a scheduled deletion becomes final (7-30 days)."
  default     = 30

  validation {
    condition     = var.deletion_window_in_days >= 7 && var.deletion_window_in_days <= 30
    error_message = "deletion_window_in_days must be between 7 and 30."
  }
}

variable "tags" {
  type        = map(string)
  description = "Tags added to every resource of the module."
  default     = {}
}
