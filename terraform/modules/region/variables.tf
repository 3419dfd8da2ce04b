################################################################################
# The region and its role
################################################################################

variable "key" {
  type        = string
  description = "Key of the region in the deployment's per-region settings, region1 or region2: the TANDEM_REGION of its functions."

  validation {
    condition     = can(regex("^region[0-9]+$", var.key))
    error_message = "key must be region<N>, e.g. region1."
  }
}

variable "name" {
  type        = string
  description = "Prefix of the region's resource names, e.g. tandem-region1 (EKS cluster, database, cache, load balancer, functions)."
}

variable "aws_region" {
  type        = string
  description = "AWS region of the provider passed to this module (the target group ARNs the load balancer controller may use)."
}

variable "account_id" {
  type        = string
  description = "AWS account ID (the target group ARNs the load balancer controller may use)."
}

variable "tags" {
  type        = map(string)
  description = "Tags added to every resource of the module."
  default     = {}
}

################################################################################
# Network
################################################################################

variable "network" {
  type = object({
    cidr_block           = string
    availability_zones   = list(string)
    public_subnet_cidrs  = list(string)
    private_subnet_cidrs = list(string)
  })
  description = "VPC layout of the region."
}

variable "single_nat_gateway" {
  type        = bool
  description = "One NAT gateway instead of one per availability zone (cheaper, less available)."
}

################################################################################
# EKS
################################################################################

variable "kubernetes_version" {
  type        = string
  description = "Kubernetes version of the cluster."
}

variable "eks_node_groups" {
  type = map(object({
    instance_types = list(string)
    ami_type       = string
    capacity_type  = string
    min_size       = number
    max_size       = number
    desired_size   = number
    disk_size_gib  = number
  }))
  description = "Managed node groups of the cluster."
}

variable "eks_endpoint_public_access" {
  type        = bool
  description = "Expose the Kubernetes API endpoint publicly, restricted to eks_public_access_cidrs."
}

variable "eks_public_access_cidrs" {
  type        = list(string)
  description = "CIDRs allowed to reach a public Kubernetes API endpoint."
}

variable "eks_admin_principal_arns" {
  type        = list(string)
  description = "IAM principals granted cluster-admin on the cluster."
}

variable "kubernetes_namespace" {
  type        = string
  description = "Namespace of the Tandem workloads (the IRSA trust policies name it)."
}

variable "service_accounts" {
  type = object({
    write    = string
    read     = string
    relay    = string
    consumer = string
  })
  description = "Kubernetes service accounts of the workloads (eks/base), which their IRSA roles trust: write, read, relay and consumer, in every region."
}

################################################################################
# Data stores
################################################################################

variable "db_instance_class" {
  type        = string
  description = "RDS instance class."
}

variable "db_multi_az" {
  type        = bool
  description = "Multi-AZ standby of the RDS instance."
}

variable "deletion_protection" {
  type        = bool
  description = "Deletion protection on the RDS instance and the ALB."
}

variable "redis_node_type" {
  type        = string
  description = "ElastiCache node type."
}

variable "redis_num_cache_clusters" {
  type        = number
  description = "Redis nodes (2+ enables automatic failover)."
}

variable "kafka_secret_arns" {
  type = object({
    relay    = string
    consumer = string
  })
  description = "SCRAM secrets (in this region; an ARN or an ARN pattern) of this region's relay (publishes this region's topic) and consumer (reads the other region's topic), which their IRSA roles may read."
}

################################################################################
# Load balancer
################################################################################

variable "certificate_arn" {
  type        = string
  description = "ACM certificate (in this region) of the HTTPS listener."
}

variable "peer_egress_ips" {
  type        = list(string)
  description = "Public IPv4 addresses of the other region's NAT gateways: its forwarded writes arrive from them, so the WAF rate limit does not count them (its clients are rate-limited where they come in)."
  default     = []
}

################################################################################
# Lambda mode
################################################################################

variable "backend" {
  type        = string
  description = "Where the Write/Read APIs run: eks (pods behind TargetGroupBinding) or lambda (functions behind the same ALB)."

  validation {
    condition     = contains(["eks", "lambda"], var.backend)
    error_message = "backend must be eks or lambda."
  }
}

variable "lambda_zip_paths" {
  type        = map(string)
  description = "Lambda packages keyed write, read and apply (paths as the caller resolves them: this module's path.module is not the deployment's)."
}

variable "function_environment" {
  type        = map(string)
  description = "Environment every Lambda function of the region gets (logging, database pool, cache); the module adds TANDEM_REGION, the RDS Proxy and Redis. Checked against the binaries' env contract by scripts/check_terraform.py."
}

variable "api_environment" {
  type        = map(string)
  description = "Environment the Write and Read functions add to function_environment (token validation)."
}

variable "write_function_environment" {
  type        = map(string)
  description = "Environment only the Write function adds (the other region's Write API a follower forwards to, the initial write region)."
  default     = {}
}

variable "read_function_environment" {
  type        = map(string)
  description = "Environment only the Read function adds (the consistency wait, the other region's Read API and the lag threshold, used while this region is a follower)."
  default     = {}
}

variable "apply_lambda" {
  type = object({
    bootstrap_servers  = string
    broker_cidr_blocks = list(string)
    topic              = string
    topic_partitions   = number
    consumer_group     = string
    scram_secret_arn   = string
  })
  description = "Run the consumer as a Lambda function behind a Kafka event source mapping (modules/lambda_kafka) reading these SASL/SCRAM bootstrap brokers (in these CIDRs), topic (the other region's, with this many partitions) and consumer group, as the SCRAM user of this secret (in this region). null: the consumer pod applies."
  default     = null
}
