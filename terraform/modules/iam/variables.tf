variable "name_prefix" {
  type        = string
  description = "Prefix of the role names, e.g. tandem-region1. IAM is global, so it must differ per region."
}

variable "oidc_provider_arn" {
  type        = string
  description = "ARN of the cluster's IAM OIDC provider (eks module output)."
}

variable "oidc_issuer" {
  type        = string
  description = "OIDC issuer without https:// (eks module output)."
}

variable "namespace" {
  type        = string
  description = "Kubernetes namespace of the Tandem service accounts."
  default     = "tandem"
}

variable "workloads" {
  type = map(object({
    service_account  = string
    secret_arns      = list(string)
    rds_db_user_arns = optional(list(string), [])
  }))
  description = "Workloads that get an IRSA role, keyed by short name (write, read, relay, consumer): the Kubernetes service account, the Secrets Manager secrets it may read, and the rds-db:connect user ARNs if it uses IAM database authentication."
}

variable "kms_key_arn" {
  type        = string
  description = "KMS key that encrypts the secrets; roles may decrypt with it only through Secrets Manager."
}

variable "tags" {
  type        = map(string)
  description = "Tags added to every resource of the module."
  default     = {}
}
