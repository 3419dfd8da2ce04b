variable "name" {
  type        = string
  description = "Identifier prefix of the instance, proxy, secrets and security groups, e.g. tandem-region1."
}

variable "vpc_id" {
  type        = string
  description = "VPC of the database."
}

variable "vpc_cidr_block" {
  type        = string
  description = "CIDR of the VPC; the rotation Lambda reaches the Secrets Manager endpoint inside it."
}

variable "subnet_ids" {
  type        = list(string)
  description = "Private subnets of the DB subnet group, the proxy and the rotation Lambda."
}

variable "allowed_security_group_ids" {
  type        = map(string)
  description = "Security groups allowed to connect to PostgreSQL directly, keyed by a static name (e.g. eks = cluster security group). A map so the keys are known at plan time."
  default     = {}
}

variable "proxy_client_security_group_ids" {
  type        = map(string)
  description = "Security groups allowed to connect to the RDS Proxy, keyed by a static name (e.g. write, read = the Lambda functions)."
  default     = {}
}

variable "engine_version" {
  type        = string
  description = "PostgreSQL engine version (major 16; a minor such as 16.4 pins it)."
  default     = "16"
}

variable "instance_class" {
  type        = string
  description = "DB instance class, e.g. db.m7g.large (Graviton)."
  default     = "db.m7g.large"
}

variable "allocated_storage_gib" {
  type        = number
  description = "Initial gp3 storage in GiB."
  default     = 50
}

variable "max_allocated_storage_gib" {
  type        = number
  description = "Upper bound for storage autoscaling in GiB."
  default     = 500
}

variable "multi_az" {
  type        = bool
  description = "Run a synchronous standby in a second availability zone (roughly doubles the instance cost)."
  default     = true
}

variable "database_name" {
  type        = string
  description = "Database created at launch; the application connects to it."
  default     = "tandem"
}

variable "master_username" {
  type        = string
  description = "Master user; its password is generated, stored and rotated by RDS in Secrets Manager."
  default     = "tandem_admin"
}

variable "app_username" {
  type        = string
  description = "Application login role, created by the bootstrap SQL in docs/deploy.md. It logs in with the password of the application secret (never grant it rds_iam: the proxy and the EKS pods use that password); IAM authentication happens between the Lambda functions and the proxy."
  default     = "tandem_app"
}

variable "backup_retention_days" {
  type        = number
  description = "Automated backup retention in days."
  default     = 14
}

variable "deletion_protection" {
  type        = bool
  description = "Refuse to delete the instance until this is set to false."
  default     = true
}

variable "kms_key_arn" {
  type        = string
  description = "KMS key for storage, Performance Insights, the secrets and the log groups."
}

variable "create_proxy" {
  type        = bool
  description = "Create an RDS Proxy (IAM auth required, TLS required) for the Lambda functions."
  default     = true
}

variable "rotation_days" {
  type        = number
  description = "Rotation period of the application secret in days."
  default     = 30
}

variable "rotation_app_version" {
  type        = string
  description = "Version of the AWS Serverless Application Repository app SecretsManagerRDSPostgreSQLRotationSingleUser; null takes the latest at plan time (pin it once deployed)."
  default     = null
}

variable "log_retention_days" {
  type        = number
  description = "Retention of the exported PostgreSQL log groups in days."
  default     = 365
}

variable "tags" {
  type        = map(string)
  description = "Tags added to every resource of the module."
  default     = {}
}
