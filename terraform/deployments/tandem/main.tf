################################################################################
# Tandem: two regions on AWS
#
# Both regions run the same components: Write API, Read API, outbox relay,
# consumer, PostgreSQL, Redis. One of them is the write region at a time (a
# role recorded in both databases, Region 1 initially, moved by `tandem
# switchover`); the other is a follower whose Write API forwards writes to the
# write region's (through its region host name) and whose consumer applies the
# write region's stream. Each region's relay publishes its outbox to its own
# topic (kafka_topics) on MSK in Region 1, which Region 2 reaches over an
# inter-region VPC peering (see modules/msk).
#
# Route 53 sends the global name to Region 1 while its /readyz is healthy and
# to Region 2 otherwise; the write name follows the write region (each
# region's GET /leader), an optimisation only: either region accepts writes.
#
# Each region is one instance of modules/region (key, network, EKS, RDS, Redis,
# IRSA roles, Lambda functions, ALB); what spans both regions is here: the
# peering, MSK, ECR and Route 53. moved.tf maps the addresses of the earlier
# flat layout (module.rds_region1, ...) to the region modules.
################################################################################

data "aws_caller_identity" "current" {
  provider = aws.region1
}

locals {
  tags = merge(var.tags, {
    Project   = var.project
    ManagedBy = "terraform"
    Stack     = "deployments/tandem"
  })

  names = {
    region1 = "${var.project}-region1"
    region2 = "${var.project}-region2"
  }

  regions      = ["region1", "region2"]
  other_region = { region1 = "region2", region2 = "region1" }

  # The SCRAM users (modules/msk) of the workloads that talk to Kafka, by the
  # region they run in. Region 1's relay and Region 2's consumer keep the names
  # they had before Region 2 took writes.
  kafka_users = {
    region1 = { relay = "relay", consumer = "consumer-region1" }
    region2 = { relay = "relay-region2", consumer = "consumer" }
  }

  # Each direction: the topic of a region's outbox, written by that region's
  # relay and read by the other region's consumer in its group. The Kafka ACLs
  # (terraform/deployments/tandem-kafka-acls) are made from this.
  kafka_streams = {
    for region in local.regions : region => {
      topic              = var.kafka_topics[region]
      relay_principal    = module.msk.scram_principals[local.kafka_users[region].relay]
      consumer_principal = module.msk.scram_principals[local.kafka_users[local.other_region[region]].consumer]
      consumer_group     = var.consumer_groups[local.other_region[region]]
    }
  }

  # Each region's Write and Read APIs reach the other region's through its
  # region host name: its own load balancer, never the write record (which can
  # point back at the caller's own region while the write region moves).
  peer_urls = { for region in local.regions : region => "https://${var.region_hostnames[local.other_region[region]]}" }

  account_id = data.aws_caller_identity.current.account_id

  # Kubernetes service accounts in eks/base; the IRSA trust policies name them.
  service_accounts = {
    write    = "tandem-write"
    read     = "tandem-read"
    relay    = "tandem-outbox-relay"
    consumer = "tandem-region2-consumer"
  }

  jwks_url = "${trimsuffix(var.jwt_issuer, "/")}/.well-known/jwks.json"

  # Region 2's apply: the consumer pod on EKS, or a Lambda function behind a
  # Kafka event source mapping (modules/lambda_kafka).
  region2_apply_lambda = var.region2_apply_mode == "lambda"

  # var.lambda_zip_paths are relative to this directory; modules/region's
  # path.module is another.
  lambda_zip_paths = { for key, file in var.lambda_zip_paths : key => "${path.module}/${file}" }
}

################################################################################
# Lambda functions' environment (both regions; modules/region adds each
# function's region, RDS Proxy and Redis)
################################################################################

locals {
  # Every function: logging, the database through the proxy, the cache.
  lambda_base_env = {
    RUST_LOG                             = var.log_level
    TANDEM_LOG_FORMAT                    = "json"
    DATABASE_IAM_PORT                    = "5432"
    DATABASE_TLS                         = "verify-full"
    DATABASE_POOL_SIZE                   = "2"
    DATABASE_POOL_TIMEOUT_MS             = "2000"
    DATABASE_CREDENTIALS_REFRESH_SECONDS = "600"
    REDIS_TTL_SECONDS                    = "300"
    REDIS_TIMEOUT_MS                     = "250"
    REDIS_COOLDOWN_MS                    = "1000"
    REDIS_KEY_PREFIX                     = "tandem"
  }

  # The Write and Read APIs: token validation.
  lambda_auth_env = {
    TANDEM_JWKS_URL           = local.jwks_url
    TANDEM_JWT_ISSUER         = var.jwt_issuer
    TANDEM_JWT_AUDIENCE       = var.jwt_audience
    TANDEM_READ_REQUIRES_AUTH = tostring(var.read_requires_auth)
  }

  # The Write API, per region: where a follower forwards writes (the other
  # region's Write API) and the write region of a deployment whose databases
  # record none yet.
  lambda_write_env = {
    region1 = {
      TANDEM_WRITE_FORWARD_URL    = local.peer_urls["region1"]
      TANDEM_INITIAL_WRITE_REGION = var.initial_write_region
    }
    region2 = {
      TANDEM_WRITE_FORWARD_URL    = local.peer_urls["region2"]
      TANDEM_INITIAL_WRITE_REGION = var.initial_write_region
    }
  }

  # The Read API, per region, for while its region is a follower (it decides
  # from its database's role): how long a read waits for a version it was told
  # about, where it points clients for reads it cannot serve (the other region's Read API),
  # and the lag past which /readyz fails.
  lambda_read_env = {
    region1 = {
      TANDEM_CONSISTENCY_WAIT_MS    = "1000"
      TANDEM_PRIMARY_READ_URL       = local.peer_urls["region1"]
      TANDEM_MAX_REPLICATION_LAG_MS = "5000"
    }
    region2 = {
      TANDEM_CONSISTENCY_WAIT_MS    = "1000"
      TANDEM_PRIMARY_READ_URL       = local.peer_urls["region2"]
      TANDEM_MAX_REPLICATION_LAG_MS = "5000"
    }
  }
}

################################################################################
# Region 1
################################################################################

module "region1" {
  source    = "../../modules/region"
  providers = { aws = aws.region1, random = random, tls = tls }

  key        = "region1"
  name       = local.names.region1
  aws_region = var.region1
  account_id = local.account_id
  tags       = local.tags

  network            = var.region1_network
  single_nat_gateway = var.single_nat_gateway

  kubernetes_version         = var.kubernetes_version
  eks_node_groups            = var.eks_node_groups
  eks_endpoint_public_access = var.eks_endpoint_public_access
  eks_public_access_cidrs    = var.eks_public_access_cidrs
  eks_admin_principal_arns   = var.eks_admin_principal_arns
  kubernetes_namespace       = var.kubernetes_namespace
  service_accounts           = local.service_accounts

  db_instance_class        = var.db_instance_class
  db_multi_az              = var.db_multi_az["region1"]
  deletion_protection      = var.db_deletion_protection
  redis_node_type          = var.redis_node_type
  redis_num_cache_clusters = var.redis_num_cache_clusters
  certificate_arn          = module.dns.certificate_arns["region1"]
  peer_egress_ips          = module.region2.nat_public_ips

  # The secrets in Region 1 itself.
  kafka_secret_arns = {
    relay    = module.msk.scram_secret_arns[local.kafka_users.region1.relay]
    consumer = module.msk.scram_secret_arns[local.kafka_users.region1.consumer]
  }

  backend                    = var.backend["region1"]
  lambda_zip_paths           = local.lambda_zip_paths
  function_environment       = local.lambda_base_env
  api_environment            = local.lambda_auth_env
  write_function_environment = local.lambda_write_env["region1"]
  read_function_environment  = local.lambda_read_env["region1"]
}

################################################################################
# Region 2
################################################################################

locals {
  # The replica of the consumer's SCRAM secret in Region 2, by exact ARN (an
  # event source mapping takes no ARN pattern): replicas keep the name and the
  # random suffix, only the region differs.
  consumer_scram_replica_arn = replace(module.msk.scram_secret_arns[local.kafka_users.region2.consumer], ":${var.region1}:", ":${var.region2}:")
}

module "region2" {
  source    = "../../modules/region"
  providers = { aws = aws.region2, random = random, tls = tls }

  key        = "region2"
  name       = local.names.region2
  aws_region = var.region2
  account_id = local.account_id
  tags       = local.tags

  network            = var.region2_network
  single_nat_gateway = var.single_nat_gateway

  kubernetes_version         = var.kubernetes_version
  eks_node_groups            = var.eks_node_groups
  eks_endpoint_public_access = var.eks_endpoint_public_access
  eks_public_access_cidrs    = var.eks_public_access_cidrs
  eks_admin_principal_arns   = var.eks_admin_principal_arns
  kubernetes_namespace       = var.kubernetes_namespace
  service_accounts           = local.service_accounts

  db_instance_class        = var.db_instance_class
  db_multi_az              = var.db_multi_az["region2"]
  deletion_protection      = var.db_deletion_protection
  redis_node_type          = var.redis_node_type
  redis_num_cache_clusters = var.redis_num_cache_clusters
  certificate_arn          = module.dns.certificate_arns["region2"]
  peer_egress_ips          = module.region1.nat_public_ips

  # The replicas in Region 2 of the secrets (modules/msk replicated_users).
  kafka_secret_arns = {
    relay    = module.msk.replica_secret_arns[local.kafka_users.region2.relay]
    consumer = module.msk.replica_secret_arns[local.kafka_users.region2.consumer]
  }

  backend                    = var.backend["region2"]
  lambda_zip_paths           = local.lambda_zip_paths
  function_environment       = local.lambda_base_env
  api_environment            = local.lambda_auth_env
  write_function_environment = local.lambda_write_env["region2"]
  read_function_environment  = local.lambda_read_env["region2"]

  # Region 2's consumer as a Lambda function (region2_apply_mode = "lambda"): a
  # self-managed Kafka event source mapping in Region 2 reads Region 1's topic
  # on MSK in Region 1 across the peering, as Region 2's consumer SCRAM user,
  # in the consumer pod's group.
  apply_lambda = local.region2_apply_lambda ? {
    bootstrap_servers  = module.msk.bootstrap_brokers_sasl_scram
    broker_cidr_blocks = [var.region1_network.cidr_block]
    topic              = var.kafka_topics["region1"]
    topic_partitions   = var.kafka_topic_partitions
    consumer_group     = var.consumer_groups["region2"]
    scram_secret_arn   = local.consumer_scram_replica_arn
  } : null
}

################################################################################
# Inter-region VPC peering (Region 2's relay and consumer -> MSK in Region 1)
################################################################################

resource "aws_vpc_peering_connection" "regions" {
  provider = aws.region1

  vpc_id      = module.region1.vpc_id
  peer_vpc_id = module.region2.vpc_id
  peer_region = var.region2
  auto_accept = false

  tags = merge(local.tags, { Name = "${var.project}-region1-region2" })
}

resource "aws_vpc_peering_connection_accepter" "regions" {
  provider = aws.region2

  vpc_peering_connection_id = aws_vpc_peering_connection.regions.id
  auto_accept               = true

  tags = merge(local.tags, { Name = "${var.project}-region1-region2" })
}

# Resolve each other's private DNS names (MSK broker names) to private IPs.
resource "aws_vpc_peering_connection_options" "requester" {
  provider = aws.region1

  vpc_peering_connection_id = aws_vpc_peering_connection_accepter.regions.id

  requester {
    allow_remote_vpc_dns_resolution = true
  }
}

resource "aws_vpc_peering_connection_options" "accepter" {
  provider = aws.region2

  vpc_peering_connection_id = aws_vpc_peering_connection_accepter.regions.id

  accepter {
    allow_remote_vpc_dns_resolution = true
  }
}

resource "aws_route" "region1_to_region2" {
  provider = aws.region1
  count    = length(var.region1_network.availability_zones)

  route_table_id            = module.region1.private_route_table_ids[count.index]
  destination_cidr_block    = var.region2_network.cidr_block
  vpc_peering_connection_id = aws_vpc_peering_connection.regions.id
}

resource "aws_route" "region2_to_region1" {
  provider = aws.region2
  count    = length(var.region2_network.availability_zones)

  route_table_id            = module.region2.private_route_table_ids[count.index]
  destination_cidr_block    = var.region1_network.cidr_block
  vpc_peering_connection_id = aws_vpc_peering_connection.regions.id
}

################################################################################
# Kafka (in Region 1, both directions' topics)
################################################################################

module "msk" {
  source    = "../../modules/msk"
  providers = { aws = aws.region1, random = random }

  name                   = local.names.region1
  vpc_id                 = module.region1.vpc_id
  subnet_ids             = module.region1.private_subnet_ids
  client_cidr_blocks     = [var.region1_network.cidr_block, var.region2_network.cidr_block]
  kafka_version          = var.kafka_version
  broker_instance_type   = var.msk_broker_instance_type
  broker_volume_size_gib = var.msk_broker_volume_size_gib
  scram_users            = concat(flatten([for users in values(local.kafka_users) : values(users)]), ["admin"])
  acl_bootstrap          = var.kafka_acl_bootstrap
  replica_region         = var.region2
  replica_kms_key_arn    = module.region2.kms_key_arn
  replicated_users       = values(local.kafka_users.region2)
  kms_key_arn            = module.region1.kms_key_arn
  tags                   = local.tags
}

################################################################################
# Container registry (pushed in Region 1, replicated to Region 2)
################################################################################

module "ecr" {
  source    = "../../modules/ecr"
  providers = { aws = aws.region1, aws.replica = aws.region2 }

  repository_names    = ["tandem-write", "tandem-read", "tandem-outbox-relay", "tandem-region2-consumer"]
  kms_key_arn         = module.region1.kms_key_arn
  replica_kms_key_arn = module.region2.kms_key_arn
  tags                = local.tags
}

################################################################################
# Route 53 and ACM
################################################################################

module "dns" {
  source = "../../modules/dns"
  providers = {
    aws         = aws.region1
    aws.region1 = aws.region1
    aws.region2 = aws.region2
  }

  zone_name        = var.zone_name
  global_hostname  = var.global_hostname
  write_hostname   = var.write_hostname
  region_hostnames = var.region_hostnames
  load_balancers = {
    region1 = { dns_name = module.region1.load_balancer_dns_name, zone_id = module.region1.load_balancer_zone_id }
    region2 = { dns_name = module.region2.load_balancer_dns_name, zone_id = module.region2.load_balancer_zone_id }
  }
  tags = local.tags
}
