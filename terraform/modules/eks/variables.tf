variable "cluster_name" {
  type        = string
  description = "Name of the EKS cluster, e.g. tandem-region1."
}

variable "kubernetes_version" {
  type        = string
  description = "Kubernetes minor version of the control plane and node groups."
  default     = "1.31"
}

variable "vpc_id" {
  type        = string
  description = "VPC the cluster runs in."
}

variable "subnet_ids" {
  type        = list(string)
  description = "Private subnets for the control plane ENIs and the node groups."
}

variable "endpoint_public_access" {
  type        = bool
  description = "Expose the Kubernetes API endpoint publicly (restricted to public_access_cidrs). Keep false when operators reach the VPC through VPN, SSM or a CI runner inside the VPC."
  default     = false
}

variable "public_access_cidrs" {
  type        = list(string)
  description = "CIDRs allowed to reach the public API endpoint when endpoint_public_access is true. Never 0.0.0.0/0."
  default     = []

  validation {
    condition     = !contains(var.public_access_cidrs, "0.0.0.0/0")
    error_message = "Do not open the Kubernetes API to 0.0.0.0/0."
  }
}

variable "admin_principal_arns" {
  type        = list(string)
  description = "IAM role or user ARNs granted cluster-admin through EKS access entries (operators, the deploy pipeline). Leave out the principal that runs terraform apply: it is made admin at creation (bootstrap_cluster_creator_admin_permissions) and a second entry for it would fail."
  default     = []
}

variable "node_groups" {
  type = map(object({
    instance_types = list(string)
    ami_type       = string
    capacity_type  = string
    min_size       = number
    max_size       = number
    desired_size   = number
    disk_size_gib  = number
  }))
  description = "Managed node groups keyed by name. ami_type e.g. AL2023_x86_64_STANDARD or AL2023_ARM_64_STANDARD (the images must then be built for arm64); capacity_type ON_DEMAND or SPOT."
  default = {
    default = {
      instance_types = ["m6i.large"]
      ami_type       = "AL2023_x86_64_STANDARD"
      capacity_type  = "ON_DEMAND"
      min_size       = 2
      max_size       = 6
      desired_size   = 3
      disk_size_gib  = 50
    }
  }
}

variable "kms_key_arn" {
  type        = string
  description = "KMS key for envelope encryption of Kubernetes Secrets and for the control-plane log group."
}

variable "log_retention_days" {
  type        = number
  description = "Retention of the control-plane log group in days."
  default     = 365
}

variable "target_group_arn_patterns" {
  type        = list(string)
  description = "Target group ARNs (wildcards allowed) the AWS Load Balancer Controller may register pod IPs in through TargetGroupBinding resources."
}

variable "tags" {
  type        = map(string)
  description = "Tags added to every resource of the module."
  default     = {}
}
