variable "name" {
  type        = string
  description = "Name prefix of the load balancer, its target groups and its WAF ACL, e.g. tandem-region1 (at most 26 characters so target group names stay within 32)."

  validation {
    condition     = length(var.name) <= 26
    error_message = "name must be at most 26 characters."
  }
}

variable "vpc_id" {
  type        = string
  description = "VPC of the load balancer and its targets."
}

variable "vpc_cidr_block" {
  type        = string
  description = "CIDR of the VPC; the load balancer may only send traffic into it, on the service port."
}

variable "public_subnet_ids" {
  type        = list(string)
  description = "Public subnets the internet-facing load balancer is placed in."
}

variable "certificate_arn" {
  type        = string
  description = "ACM certificate (same region) served by the HTTPS listener."
}

variable "backend" {
  type        = string
  description = "Where the Write and Read targets run: eks (pod IPs registered by TargetGroupBinding objects) or lambda (the Lambda target groups passed in lambda_target_group_arns)."
  default     = "eks"

  validation {
    condition     = contains(["eks", "lambda"], var.backend)
    error_message = "backend must be eks or lambda."
  }
}

variable "lambda_target_group_arns" {
  type        = map(string)
  description = "Lambda target group ARNs keyed write and read; required when backend is lambda."
  default     = {}
}

variable "service_port" {
  type        = number
  description = "Port the Write and Read pods listen on (PORT)."
  default     = 8080
}

variable "pod_security_group_id" {
  type        = string
  description = "Security group of the pods (the EKS cluster security group): the load balancer is allowed in on service_port."
}

variable "deletion_protection" {
  type        = bool
  description = "Enable deletion protection on the load balancer."
  default     = true
}

variable "rate_limit_per_5_minutes" {
  type        = number
  description = "Requests per client IP per five minutes before WAF blocks it."
  default     = 3000
}

variable "rate_limit_exempt_ips" {
  type        = list(string)
  description = "IPv4 addresses (no prefix) the per-IP rate limit does not count: the other region's NAT gateways, from which its Write API forwards writes to this region."
  default     = []
}

variable "kms_key_arn" {
  type        = string
  description = "KMS key for the WAF log group."
}

variable "log_retention_days" {
  type        = number
  description = "Retention of WAF logs (CloudWatch) and ALB access logs (S3) in days."
  default     = 365
}

variable "tags" {
  type        = map(string)
  description = "Tags added to every resource of the module."
  default     = {}
}
