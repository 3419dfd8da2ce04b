# Copy to terraform.tfvars (git-ignored) and fill in. Values here are examples.

project = "tandem"
region1 = "us-east-1"
region2 = "us-west-2"

region1_network = {
  cidr_block           = "10.10.0.0/16"
  availability_zones   = ["us-east-1a", "us-east-1b", "us-east-1c"]
  public_subnet_cidrs  = ["10.10.0.0/22", "10.10.4.0/22", "10.10.8.0/22"]
  private_subnet_cidrs = ["10.10.64.0/18", "10.10.128.0/18", "10.10.192.0/18"]
}

region2_network = {
  cidr_block           = "10.20.0.0/16"
  availability_zones   = ["us-west-2a", "us-west-2b", "us-west-2c"]
  public_subnet_cidrs  = ["10.20.0.0/22", "10.20.4.0/22", "10.20.8.0/22"]
  private_subnet_cidrs = ["10.20.64.0/18", "10.20.128.0/18", "10.20.192.0/18"]
}

# Cost: one NAT per AZ (3 per region) survives an AZ outage; true saves ~2/3 of the NAT hours.
single_nat_gateway = false

kubernetes_version = "1.31"

# Operators reach the Kubernetes API from these egress IPs (set false and [] when using a VPN).
eks_endpoint_public_access = true
eks_public_access_cidrs    = ["203.0.113.10/32"]
# Not the principal that runs `terraform apply`: it becomes cluster admin automatically.
eks_admin_principal_arns = ["arn:aws:iam::123456789012:role/platform-admin", "arn:aws:iam::123456789012:role/tandem-deploy"]

db_instance_class = "db.m7g.large"
db_multi_az = {
  region1 = true
  region2 = false # a follower can be rebuilt from Kafka + a Region 1 snapshot; set true before a switchover to it
}

redis_node_type          = "cache.m7g.large"
redis_num_cache_clusters = 2

msk_broker_instance_type   = "kafka.m7g.large"
msk_broker_volume_size_gib = 100

backend = {
  region1 = "eks"
  region2 = "eks"
}

# Region 2's apply: the consumer pod (eks) or a Lambda function behind a Kafka
# event source mapping (lambda; then render the Region 2 overlay with
# eks/components/region2-apply-lambda).
region2_apply_mode = "eks"

zone_name       = "tandem.example.com"
global_hostname = "api.tandem.example.com"
write_hostname  = "write.tandem.example.com"
region_hostnames = {
  region1 = "region1.tandem.example.com"
  region2 = "region2.tandem.example.com"
}

jwt_issuer         = "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_EXAMPLE"
jwt_audience       = "1example23456789"
read_requires_auth = true

tags = {
  Owner      = "platform"
  CostCenter = "tandem"
}
