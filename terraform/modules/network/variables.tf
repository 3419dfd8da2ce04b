variable "name" {
  type        = string
  description = "Name prefix for every network resource, e.g. tandem-region1."
}

variable "cidr_block" {
  type        = string
  description = "IPv4 CIDR of the VPC. The two regions must not overlap: they are peered so Region 2 can reach MSK in Region 1."
}

variable "availability_zones" {
  type        = list(string)
  description = "Availability zones to spread subnets over (at least two; three recommended for MSK and EKS)."

  validation {
    condition     = length(var.availability_zones) >= 2
    error_message = "At least two availability zones are required."
  }
}

variable "public_subnet_cidrs" {
  type        = list(string)
  description = "CIDRs of the public subnets (ALB, NAT gateways), one per availability zone."
}

variable "private_subnet_cidrs" {
  type        = list(string)
  description = "CIDRs of the private subnets (EKS nodes and pods, RDS, ElastiCache, MSK, Lambda), one per availability zone."
}

variable "single_nat_gateway" {
  type        = bool
  description = "true: one NAT gateway for the whole VPC (cheaper, but egress fails with its availability zone). false: one NAT gateway per availability zone."
  default     = false
}

variable "eks_cluster_name" {
  type        = string
  description = "Name of the EKS cluster that uses this VPC; subnets are tagged so the AWS Load Balancer Controller can discover them."
}

variable "kms_key_arn" {
  type        = string
  description = "KMS key that encrypts the VPC flow log group."
}

variable "flow_log_retention_days" {
  type        = number
  description = "Retention of the VPC flow log group in days."
  default     = 365
}

variable "tags" {
  type        = map(string)
  description = "Tags added to every resource of the module."
  default     = {}
}
