################################################################################
# Regions and naming
################################################################################

variable "project" {
  type        = string
  description = "Prefix of every resource name."
  default     = "tandem"
}

variable "region1" {
  type        = string
  description = "AWS region of Region 1 (the initial write region; hosts MSK)."
}

variable "region2" {
  type        = string
  description = "AWS region of Region 2 (a follower until a switchover makes it the write region)."
}

variable "tags" {
  type        = map(string)
  description = "Tags added to every resource (through the providers' default_tags)."
  default     = {}
}

################################################################################
# Network
################################################################################

variable "region1_network" {
  type = object({
    cidr_block           = string
    availability_zones   = list(string)
    public_subnet_cidrs  = list(string)
    private_subnet_cidrs = list(string)
  })
  description = "VPC layout of Region 1. Must not overlap region2_network (the VPCs are peered)."
}

variable "region2_network" {
  type = object({
    cidr_block           = string
    availability_zones   = list(string)
    public_subnet_cidrs  = list(string)
    private_subnet_cidrs = list(string)
  })
  description = "VPC layout of Region 2. Must not overlap region1_network (the VPCs are peered)."
}

variable "single_nat_gateway" {
  type        = bool
  description = "One NAT gateway per VPC instead of one per availability zone (cheaper, less available)."
  default     = false
}

################################################################################
# EKS
################################################################################

variable "kubernetes_version" {
  type        = string
  description = "Kubernetes version of both clusters."
  default     = "1.31"
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
  description = "Managed node groups of each cluster (same shape in both regions)."
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

variable "eks_endpoint_public_access" {
  type        = bool
  description = "Expose the Kubernetes API endpoints publicly, restricted to eks_public_access_cidrs."
  default     = false
}

variable "eks_public_access_cidrs" {
  type        = list(string)
  description = "CIDRs allowed to reach public Kubernetes API endpoints (operator and CI egress IPs)."
  default     = []
}

variable "eks_admin_principal_arns" {
  type        = list(string)
  description = "IAM principals (operators, the deploy role) granted cluster-admin on both clusters; not the principal running terraform apply, which gets admin automatically."
  default     = []
}

variable "kubernetes_namespace" {
  type        = string
  description = "Namespace of the Tandem workloads (must match eks/base)."
  default     = "tandem"
}

################################################################################
# Data stores
################################################################################

variable "db_instance_class" {
  type        = string
  description = "RDS instance class of both regions."
  default     = "db.m7g.large"
}

variable "db_multi_az" {
  type        = map(bool)
  description = "Multi-AZ standby per region, keyed region1 and region2."
  default = {
    region1 = true
    region2 = true
  }
}

variable "db_deletion_protection" {
  type        = bool
  description = "Deletion protection on both RDS instances and both ALBs."
  default     = true
}

variable "redis_node_type" {
  type        = string
  description = "ElastiCache node type of both regions."
  default     = "cache.m7g.large"
}

variable "redis_num_cache_clusters" {
  type        = number
  description = "Redis nodes per region (2+ enables automatic failover)."
  default     = 2
}

variable "kafka_version" {
  type        = string
  description = "Kafka version of the MSK cluster. The local broker and every test run Apache Kafka 4.1 (deploy/local/kafka/pom.xml); keep the two on one line. An existing ZooKeeper-mode cluster cannot move to KRaft in place: set its version explicitly (docs/deploy.md)."
  default     = "4.1.x.kraft"
}

variable "msk_broker_instance_type" {
  type        = string
  description = "MSK broker instance type."
  default     = "kafka.m7g.large"
}

variable "msk_broker_volume_size_gib" {
  type        = number
  description = "EBS volume per MSK broker in GiB."
  default     = 100
}

variable "kafka_topics" {
  type        = map(string)
  description = "Kafka topic of the document events per direction, keyed by the region whose outbox it carries: that region's relay publishes it and the other region's consumer reads it (KAFKA_TOPIC in eks/overlays). region1's keeps the name it had before Region 2 took writes."
  default = {
    region1 = "tandem.documents"
    region2 = "tandem.documents.region2"
  }

  validation {
    condition     = length(setsubtract(["region1", "region2"], keys(var.kafka_topics))) == 0 && length(distinct(values(var.kafka_topics))) == length(var.kafka_topics)
    error_message = "kafka_topics needs the keys region1 and region2, with different topics."
  }
}

variable "kafka_topic_partitions" {
  type        = number
  description = "Partition count of each topic: what the relays create them with (KAFKA_TOPIC_PARTITIONS, default 6). An apply function counts each in the replication lag."
  default     = 6
}

variable "consumer_groups" {
  type        = map(string)
  description = "Kafka consumer group of each region's consumer, keyed by the region it applies to: the consumer pod's KAFKA_GROUP_ID (eks/overlays), which a Lambda event source mapping joins too."
  default = {
    region1 = "tandem-region1"
    region2 = "tandem-region2"
  }

  validation {
    condition     = length(setsubtract(["region1", "region2"], keys(var.consumer_groups))) == 0 && length(distinct(values(var.consumer_groups))) == length(var.consumer_groups)
    error_message = "consumer_groups needs the keys region1 and region2, with different groups."
  }
}

variable "initial_write_region" {
  type        = string
  description = "Write region of a deployment whose databases record none yet (TANDEM_INITIAL_WRITE_REGION of both Write APIs). Only the first start reads it: afterwards the write region recorded in the databases, moved by `tandem switchover`, decides; changing this later moves nothing."
  default     = "region1"

  validation {
    condition     = contains(["region1", "region2"], var.initial_write_region)
    error_message = "initial_write_region must be region1 or region2."
  }
}

variable "kafka_acl_bootstrap" {
  type        = bool
  description = "true only while a new MSK cluster (or one created before ACLs were enforced) gets its first ACLs: MSK then allows what no ACL covers, so the admin user can create them. Apply, apply terraform/deployments/tandem-kafka-acls, then remove it and apply again (docs/deploy.md, \"Kafka ACLs\")."
  default     = false
}

################################################################################
# Compute mode of the Write and Read APIs
################################################################################

variable "backend" {
  type        = map(string)
  description = "Where the Write/Read APIs run per region (keys region1, region2): eks (pods behind TargetGroupBinding) or lambda (functions behind the same ALB). The relays always run on EKS; Region 2's consumer follows region2_apply_mode."
  default = {
    region1 = "eks"
    region2 = "eks"
  }

  validation {
    condition     = alltrue([for mode in values(var.backend) : contains(["eks", "lambda"], mode)])
    error_message = "backend values must be eks or lambda."
  }
}

variable "region2_apply_mode" {
  type        = string
  description = "What applies Region 1's change events to Region 2: eks (the tandem-region2-consumer pod, one elected replica) or lambda (tandem-region2-apply-lambda behind a Kafka event source mapping, modules/lambda_kafka). In lambda mode, render the Region 2 overlay with eks/components/region2-apply-lambda so the pod does not run (docs/deploy.md). Region 1's consumer always runs as a pod."
  default     = "eks"

  validation {
    condition     = contains(["eks", "lambda"], var.region2_apply_mode)
    error_message = "region2_apply_mode must be eks or lambda."
  }
}

variable "lambda_zip_paths" {
  type        = map(string)
  description = "Lambda packages keyed write, read and apply, built by `cargo lambda build --release --arm64 --output-format zip` (-p tandem-write -p tandem-read -p tandem-region2-apply). Relative to this directory."
  default = {
    write = "../../../target/lambda/tandem-write/bootstrap.zip"
    read  = "../../../target/lambda/tandem-read/bootstrap.zip"
    apply = "../../../target/lambda/tandem-region2-apply-lambda/bootstrap.zip"
  }
}

################################################################################
# DNS and TLS
################################################################################

variable "zone_name" {
  type        = string
  description = "Existing public Route 53 hosted zone, e.g. tandem.example.com."
}

variable "global_hostname" {
  type        = string
  description = "Global API host name with failover, e.g. api.tandem.example.com."
}

variable "write_hostname" {
  type        = string
  description = "Write host name, e.g. write.tandem.example.com: a failover record that follows the write region (each region's GET /leader), an optimisation only, since either region's Write API accepts writes."
}

variable "region_hostnames" {
  type        = map(string)
  description = "Per-region host names keyed region1 and region2. Each region's Write and Read APIs reach the other's through its name (TANDEM_WRITE_FORWARD_URL, TANDEM_PRIMARY_READ_URL)."
}

################################################################################
# Authentication (Amazon Cognito)
################################################################################

variable "jwt_issuer" {
  type        = string
  description = "Issuer of the access tokens (TANDEM_JWT_ISSUER), e.g. https://cognito-idp.<region>.amazonaws.com/<user pool id>."
}

variable "jwt_audience" {
  type        = string
  description = "Expected audience / client ID of the access tokens (TANDEM_JWT_AUDIENCE)."
}

variable "read_requires_auth" {
  type        = bool
  description = "Whether reads need a token too (TANDEM_READ_REQUIRES_AUTH)."
  default     = true
}

variable "log_level" {
  type        = string
  description = "RUST_LOG of the Lambda functions."
  default     = "info"
}
