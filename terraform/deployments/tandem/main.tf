################################################################################
# Tandem: two regions on AWS
#
# Region 1 (primary): Write API, Read API, outbox relay, PostgreSQL, Redis, MSK.
# Region 2 (replica): Read API, Kafka consumer, PostgreSQL, Redis; it reads
# Kafka in Region 1 over an inter-region VPC peering (see modules/msk).
# Route 53 sends the global name to Region 1 while its /readyz is healthy and
# to Region 2 otherwise; the write name always goes to Region 1.
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

  account_id = data.aws_caller_identity.current.account_id

  # Kubernetes service accounts in eks/base; the IRSA trust policies name them.
  service_accounts = {
    write    = "tandem-write"
    read     = "tandem-read"
    relay    = "tandem-outbox-relay"
    consumer = "tandem-region2-consumer"
  }

  # Target group names are <name>-write / <name>-read (modules/alb).
  target_group_arn_patterns = {
    region1 = ["arn:aws:elasticloadbalancing:${var.region1}:${local.account_id}:targetgroup/${local.names.region1}-*/*"]
    region2 = ["arn:aws:elasticloadbalancing:${var.region2}:${local.account_id}:targetgroup/${local.names.region2}-*/*"]
  }

  jwks_url = "${trimsuffix(var.jwt_issuer, "/")}/.well-known/jwks.json"

  lambda = {
    region1 = var.backend["region1"] == "lambda"
    region2 = var.backend["region2"] == "lambda"
  }

  # Region 2's apply: the consumer pod on EKS, or a Lambda function behind a
  # Kafka event source mapping (modules/lambda_kafka).
  region2_apply_lambda = var.region2_apply_mode == "lambda"

  # Region 2 reaches the RDS Proxy from Lambda functions: its Read API's, its
  # apply's, or both.
  region2_proxy_clients = merge(
    local.lambda.region2 ? { read = module.lambda_read_region2[0].security_group_id } : {},
    local.region2_apply_lambda ? { apply = module.lambda_apply_region2[0].security_group_id } : {},
  )
}

################################################################################
# Region 1: keys and network
################################################################################

module "kms_region1" {
  source    = "../../modules/kms"
  providers = { aws = aws.region1 }

  name = local.names.region1
  tags = local.tags
}

module "network_region1" {
  source    = "../../modules/network"
  providers = { aws = aws.region1 }

  name                 = local.names.region1
  cidr_block           = var.region1_network.cidr_block
  availability_zones   = var.region1_network.availability_zones
  public_subnet_cidrs  = var.region1_network.public_subnet_cidrs
  private_subnet_cidrs = var.region1_network.private_subnet_cidrs
  single_nat_gateway   = var.single_nat_gateway
  eks_cluster_name     = local.names.region1
  kms_key_arn          = module.kms_region1.key_arn
  tags                 = local.tags
}

################################################################################
# Region 2: keys and network
################################################################################

module "kms_region2" {
  source    = "../../modules/kms"
  providers = { aws = aws.region2 }

  name = local.names.region2
  tags = local.tags
}

module "network_region2" {
  source    = "../../modules/network"
  providers = { aws = aws.region2 }

  name                 = local.names.region2
  cidr_block           = var.region2_network.cidr_block
  availability_zones   = var.region2_network.availability_zones
  public_subnet_cidrs  = var.region2_network.public_subnet_cidrs
  private_subnet_cidrs = var.region2_network.private_subnet_cidrs
  single_nat_gateway   = var.single_nat_gateway
  eks_cluster_name     = local.names.region2
  kms_key_arn          = module.kms_region2.key_arn
  tags                 = local.tags
}

################################################################################
# Inter-region VPC peering (Region 2 consumer -> MSK in Region 1)
################################################################################

resource "aws_vpc_peering_connection" "regions" {
  provider = aws.region1

  vpc_id      = module.network_region1.vpc_id
  peer_vpc_id = module.network_region2.vpc_id
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

  route_table_id            = module.network_region1.private_route_table_ids[count.index]
  destination_cidr_block    = var.region2_network.cidr_block
  vpc_peering_connection_id = aws_vpc_peering_connection.regions.id
}

resource "aws_route" "region2_to_region1" {
  provider = aws.region2
  count    = length(var.region2_network.availability_zones)

  route_table_id            = module.network_region2.private_route_table_ids[count.index]
  destination_cidr_block    = var.region1_network.cidr_block
  vpc_peering_connection_id = aws_vpc_peering_connection.regions.id
}

################################################################################
# EKS clusters
################################################################################

module "eks_region1" {
  source    = "../../modules/eks"
  providers = { aws = aws.region1, tls = tls }

  cluster_name              = local.names.region1
  kubernetes_version        = var.kubernetes_version
  vpc_id                    = module.network_region1.vpc_id
  subnet_ids                = module.network_region1.private_subnet_ids
  endpoint_public_access    = var.eks_endpoint_public_access
  public_access_cidrs       = var.eks_public_access_cidrs
  admin_principal_arns      = var.eks_admin_principal_arns
  node_groups               = var.eks_node_groups
  kms_key_arn               = module.kms_region1.key_arn
  target_group_arn_patterns = local.target_group_arn_patterns.region1
  tags                      = local.tags
}

module "eks_region2" {
  source    = "../../modules/eks"
  providers = { aws = aws.region2, tls = tls }

  cluster_name              = local.names.region2
  kubernetes_version        = var.kubernetes_version
  vpc_id                    = module.network_region2.vpc_id
  subnet_ids                = module.network_region2.private_subnet_ids
  endpoint_public_access    = var.eks_endpoint_public_access
  public_access_cidrs       = var.eks_public_access_cidrs
  admin_principal_arns      = var.eks_admin_principal_arns
  node_groups               = var.eks_node_groups
  kms_key_arn               = module.kms_region2.key_arn
  target_group_arn_patterns = local.target_group_arn_patterns.region2
  tags                      = local.tags
}

################################################################################
# PostgreSQL
################################################################################

module "rds_region1" {
  source    = "../../modules/rds"
  providers = { aws = aws.region1, random = random }

  name                       = local.names.region1
  vpc_id                     = module.network_region1.vpc_id
  vpc_cidr_block             = module.network_region1.vpc_cidr_block
  subnet_ids                 = module.network_region1.private_subnet_ids
  allowed_security_group_ids = { eks = module.eks_region1.cluster_security_group_id }
  proxy_client_security_group_ids = local.lambda.region1 ? {
    write = module.lambda_write_region1[0].security_group_id
    read  = module.lambda_read_region1[0].security_group_id
  } : {}
  instance_class      = var.db_instance_class
  multi_az            = var.db_multi_az["region1"]
  deletion_protection = var.db_deletion_protection
  create_proxy        = local.lambda.region1
  kms_key_arn         = module.kms_region1.key_arn
  tags                = local.tags
}

module "rds_region2" {
  source    = "../../modules/rds"
  providers = { aws = aws.region2, random = random }

  name                            = local.names.region2
  vpc_id                          = module.network_region2.vpc_id
  vpc_cidr_block                  = module.network_region2.vpc_cidr_block
  subnet_ids                      = module.network_region2.private_subnet_ids
  allowed_security_group_ids      = { eks = module.eks_region2.cluster_security_group_id }
  proxy_client_security_group_ids = local.region2_proxy_clients
  instance_class                  = var.db_instance_class
  multi_az                        = var.db_multi_az["region2"]
  deletion_protection             = var.db_deletion_protection
  create_proxy                    = local.lambda.region2 || local.region2_apply_lambda
  kms_key_arn                     = module.kms_region2.key_arn
  tags                            = local.tags
}

################################################################################
# Redis
################################################################################

module "elasticache_region1" {
  source    = "../../modules/elasticache"
  providers = { aws = aws.region1, random = random }

  name       = local.names.region1
  vpc_id     = module.network_region1.vpc_id
  subnet_ids = module.network_region1.private_subnet_ids
  allowed_security_group_ids = merge(
    { eks = module.eks_region1.cluster_security_group_id },
    local.lambda.region1 ? {
      write = module.lambda_write_region1[0].security_group_id
      read  = module.lambda_read_region1[0].security_group_id
    } : {},
  )
  node_type          = var.redis_node_type
  num_cache_clusters = var.redis_num_cache_clusters
  kms_key_arn        = module.kms_region1.key_arn
  tags               = local.tags
}

module "elasticache_region2" {
  source    = "../../modules/elasticache"
  providers = { aws = aws.region2, random = random }

  name       = local.names.region2
  vpc_id     = module.network_region2.vpc_id
  subnet_ids = module.network_region2.private_subnet_ids
  allowed_security_group_ids = merge(
    { eks = module.eks_region2.cluster_security_group_id },
    local.region2_proxy_clients,
  )
  node_type          = var.redis_node_type
  num_cache_clusters = var.redis_num_cache_clusters
  kms_key_arn        = module.kms_region2.key_arn
  tags               = local.tags
}

################################################################################
# Kafka (Region 1 only)
################################################################################

module "msk" {
  source    = "../../modules/msk"
  providers = { aws = aws.region1, random = random }

  name                   = local.names.region1
  vpc_id                 = module.network_region1.vpc_id
  subnet_ids             = module.network_region1.private_subnet_ids
  client_cidr_blocks     = [var.region1_network.cidr_block, var.region2_network.cidr_block]
  kafka_version          = var.kafka_version
  broker_instance_type   = var.msk_broker_instance_type
  broker_volume_size_gib = var.msk_broker_volume_size_gib
  scram_users            = ["relay", "consumer", "admin"]
  acl_bootstrap          = var.kafka_acl_bootstrap
  replica_region         = var.region2
  replica_kms_key_arn    = module.kms_region2.key_arn
  replicated_users       = ["consumer"]
  kms_key_arn            = module.kms_region1.key_arn
  tags                   = local.tags
}

################################################################################
# Container registry (pushed in Region 1, replicated to Region 2)
################################################################################

module "ecr" {
  source    = "../../modules/ecr"
  providers = { aws = aws.region1, aws.replica = aws.region2 }

  repository_names    = ["tandem-write", "tandem-read", "tandem-outbox-relay", "tandem-region2-consumer"]
  kms_key_arn         = module.kms_region1.key_arn
  replica_kms_key_arn = module.kms_region2.key_arn
  tags                = local.tags
}

################################################################################
# IRSA roles of the workloads
################################################################################

module "iam_region1" {
  source    = "../../modules/iam"
  providers = { aws = aws.region1 }

  name_prefix       = local.names.region1
  oidc_provider_arn = module.eks_region1.oidc_provider_arn
  oidc_issuer       = module.eks_region1.oidc_issuer
  namespace         = var.kubernetes_namespace
  kms_key_arn       = module.kms_region1.key_arn
  tags              = local.tags

  workloads = {
    write = {
      service_account = local.service_accounts.write
      secret_arns     = [module.rds_region1.app_secret_arn, module.elasticache_region1.auth_secret_arn]
    }
    read = {
      service_account = local.service_accounts.read
      secret_arns     = [module.rds_region1.app_secret_arn, module.elasticache_region1.auth_secret_arn]
    }
    relay = {
      service_account = local.service_accounts.relay
      secret_arns     = [module.rds_region1.app_secret_arn, module.msk.scram_secret_arns["relay"]]
    }
  }
}

module "iam_region2" {
  source    = "../../modules/iam"
  providers = { aws = aws.region2 }

  name_prefix       = local.names.region2
  oidc_provider_arn = module.eks_region2.oidc_provider_arn
  oidc_issuer       = module.eks_region2.oidc_issuer
  namespace         = var.kubernetes_namespace
  kms_key_arn       = module.kms_region2.key_arn
  tags              = local.tags

  workloads = {
    read = {
      service_account = local.service_accounts.read
      secret_arns     = [module.rds_region2.app_secret_arn, module.elasticache_region2.auth_secret_arn]
    }
    consumer = {
      service_account = local.service_accounts.consumer
      secret_arns = [
        module.rds_region2.app_secret_arn,
        module.elasticache_region2.auth_secret_arn,
        module.msk.replica_secret_arns["consumer"],
      ]
    }
  }
}

################################################################################
# Lambda mode: Write and Read functions behind the ALB, through RDS Proxy
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
    CACHE_TTL_SECONDS                    = "300"
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
}

module "lambda_write_region1" {
  source    = "../../modules/lambda"
  providers = { aws = aws.region1 }
  count     = local.lambda.region1 ? 1 : 0

  function_name = "${local.names.region1}-write"
  description   = "Tandem Write API (Region 1)"
  zip_path      = "${path.module}/${var.lambda_zip_paths["write"]}"
  environment = merge(local.lambda_base_env, local.lambda_auth_env, {
    TANDEM_REGION           = "region1"
    DATABASE_IAM_HOST       = module.rds_region1.proxy_endpoint
    DATABASE_IAM_USER       = module.rds_region1.app_username
    DATABASE_IAM_DBNAME     = module.rds_region1.database_name
    REDIS_URL               = module.elasticache_region1.redis_url
    REDIS_AUTH_SECRET_ID    = module.elasticache_region1.auth_secret_name
    TANDEM_MIGRATE_ON_START = "true"
  })
  vpc_id                     = module.network_region1.vpc_id
  vpc_cidr_block             = module.network_region1.vpc_cidr_block
  subnet_ids                 = module.network_region1.private_subnet_ids
  database_security_group_id = module.rds_region1.proxy_security_group_id
  redis_security_group_id    = module.elasticache_region1.security_group_id
  secret_arns                = [module.elasticache_region1.auth_secret_arn]
  rds_db_user_arns           = [module.rds_region1.proxy_db_user_arn]
  kms_key_arn                = module.kms_region1.key_arn
  tags                       = local.tags
}

module "lambda_read_region1" {
  source    = "../../modules/lambda"
  providers = { aws = aws.region1 }
  count     = local.lambda.region1 ? 1 : 0

  function_name = "${local.names.region1}-read"
  description   = "Tandem Read API (Region 1)"
  zip_path      = "${path.module}/${var.lambda_zip_paths["read"]}"
  environment = merge(local.lambda_base_env, local.lambda_auth_env, {
    TANDEM_REGION           = "region1"
    DATABASE_IAM_HOST       = module.rds_region1.proxy_endpoint
    DATABASE_IAM_USER       = module.rds_region1.app_username
    DATABASE_IAM_DBNAME     = module.rds_region1.database_name
    REDIS_URL               = module.elasticache_region1.redis_url
    REDIS_AUTH_SECRET_ID    = module.elasticache_region1.auth_secret_name
    TANDEM_MIGRATE_ON_START = "false"
  })
  vpc_id                     = module.network_region1.vpc_id
  vpc_cidr_block             = module.network_region1.vpc_cidr_block
  subnet_ids                 = module.network_region1.private_subnet_ids
  database_security_group_id = module.rds_region1.proxy_security_group_id
  redis_security_group_id    = module.elasticache_region1.security_group_id
  secret_arns                = [module.elasticache_region1.auth_secret_arn]
  rds_db_user_arns           = [module.rds_region1.proxy_db_user_arn]
  kms_key_arn                = module.kms_region1.key_arn
  tags                       = local.tags
}

module "lambda_read_region2" {
  source    = "../../modules/lambda"
  providers = { aws = aws.region2 }
  count     = local.lambda.region2 ? 1 : 0

  function_name = "${local.names.region2}-read"
  description   = "Tandem Read API (Region 2 replica)"
  zip_path      = "${path.module}/${var.lambda_zip_paths["read"]}"
  environment = merge(local.lambda_base_env, local.lambda_auth_env, {
    TANDEM_REGION                 = "region2"
    DATABASE_IAM_HOST             = module.rds_region2.proxy_endpoint
    DATABASE_IAM_USER             = module.rds_region2.app_username
    DATABASE_IAM_DBNAME           = module.rds_region2.database_name
    REDIS_URL                     = module.elasticache_region2.redis_url
    REDIS_AUTH_SECRET_ID          = module.elasticache_region2.auth_secret_name
    TANDEM_MIGRATE_ON_START       = "false"
    TANDEM_CONSISTENCY_WAIT_MS    = "1000"
    TANDEM_PRIMARY_READ_URL       = "https://${var.region_hostnames["region1"]}"
    TANDEM_MAX_REPLICATION_LAG_MS = "5000"
  })
  vpc_id                     = module.network_region2.vpc_id
  vpc_cidr_block             = module.network_region2.vpc_cidr_block
  subnet_ids                 = module.network_region2.private_subnet_ids
  database_security_group_id = module.rds_region2.proxy_security_group_id
  redis_security_group_id    = module.elasticache_region2.security_group_id
  secret_arns                = [module.elasticache_region2.auth_secret_arn]
  rds_db_user_arns           = [module.rds_region2.proxy_db_user_arn]
  kms_key_arn                = module.kms_region2.key_arn
  tags                       = local.tags
}

################################################################################
# Region 2's apply as a Lambda function (region2_apply_mode = "lambda")
#
# A self-managed Kafka event source mapping in Region 2 reads the MSK topic in
# Region 1 across the peering, as the consumer SCRAM user, in the consumer
# pod's group; the function applies each batch to Region 2's PostgreSQL (through
# the RDS Proxy) and Redis. In this mode the pod must not run: render the
# Region 2 overlay with eks/components/region2-apply-lambda (docs/deploy.md).
################################################################################

locals {
  # The replica of the consumer's SCRAM secret in Region 2, by exact ARN (an
  # event source mapping takes no ARN pattern): replicas keep the name and the
  # random suffix, only the region differs.
  consumer_scram_replica_arn = replace(module.msk.scram_secret_arns["consumer"], ":${var.region1}:", ":${var.region2}:")
}

module "lambda_apply_region2" {
  source    = "../../modules/lambda_kafka"
  providers = { aws = aws.region2 }
  count     = local.region2_apply_lambda ? 1 : 0

  function_name = "${local.names.region2}-apply"
  description   = "Tandem Region 2 apply (Kafka change events to Region 2's PostgreSQL and Redis)"
  zip_path      = "${path.module}/${var.lambda_zip_paths["apply"]}"
  environment = merge(local.lambda_base_env, {
    TANDEM_REGION          = "region2"
    DATABASE_IAM_HOST      = module.rds_region2.proxy_endpoint
    DATABASE_IAM_USER      = module.rds_region2.app_username
    DATABASE_IAM_DBNAME    = module.rds_region2.database_name
    REDIS_URL              = module.elasticache_region2.redis_url
    REDIS_AUTH_SECRET_ID   = module.elasticache_region2.auth_secret_name
    KAFKA_TOPIC            = var.kafka_topic
    KAFKA_TOPIC_PARTITIONS = tostring(var.kafka_topic_partitions)
  })
  vpc_id                     = module.network_region2.vpc_id
  subnet_ids                 = module.network_region2.private_subnet_ids
  database_security_group_id = module.rds_region2.proxy_security_group_id
  redis_security_group_id    = module.elasticache_region2.security_group_id
  secret_arns                = [module.elasticache_region2.auth_secret_arn]
  rds_db_user_arns           = [module.rds_region2.proxy_db_user_arn]
  kms_key_arn                = module.kms_region2.key_arn
  # At least one concurrent invocation per partition, and a few for retries.
  reserved_concurrency = var.kafka_topic_partitions + 2

  kafka_bootstrap_servers  = module.msk.bootstrap_brokers_sasl_scram
  kafka_broker_cidr_blocks = [var.region1_network.cidr_block]
  kafka_topic              = var.kafka_topic
  kafka_consumer_group     = var.consumer_group
  kafka_scram_secret_arn   = local.consumer_scram_replica_arn
  tags                     = local.tags
}

################################################################################
# Load balancers (method routing, HTTPS only, WAF)
################################################################################

module "alb_region1" {
  source    = "../../modules/alb"
  providers = { aws = aws.region1 }

  name                  = local.names.region1
  vpc_id                = module.network_region1.vpc_id
  vpc_cidr_block        = module.network_region1.vpc_cidr_block
  public_subnet_ids     = module.network_region1.public_subnet_ids
  certificate_arn       = module.dns.certificate_arns["region1"]
  backend               = var.backend["region1"]
  serve_writes          = true
  pod_security_group_id = module.eks_region1.cluster_security_group_id
  lambda_target_group_arns = local.lambda.region1 ? {
    write = module.lambda_write_region1[0].target_group_arn
    read  = module.lambda_read_region1[0].target_group_arn
  } : {}
  deletion_protection = var.db_deletion_protection
  kms_key_arn         = module.kms_region1.key_arn
  tags                = local.tags
}

module "alb_region2" {
  source    = "../../modules/alb"
  providers = { aws = aws.region2 }

  name                     = local.names.region2
  vpc_id                   = module.network_region2.vpc_id
  vpc_cidr_block           = module.network_region2.vpc_cidr_block
  public_subnet_ids        = module.network_region2.public_subnet_ids
  certificate_arn          = module.dns.certificate_arns["region2"]
  backend                  = var.backend["region2"]
  serve_writes             = false
  pod_security_group_id    = module.eks_region2.cluster_security_group_id
  lambda_target_group_arns = local.lambda.region2 ? { read = module.lambda_read_region2[0].target_group_arn } : {}
  deletion_protection      = var.db_deletion_protection
  kms_key_arn              = module.kms_region2.key_arn
  tags                     = local.tags
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
    region1 = { dns_name = module.alb_region1.dns_name, zone_id = module.alb_region1.zone_id }
    region2 = { dns_name = module.alb_region2.dns_name, zone_id = module.alb_region2.zone_id }
  }
  tags = local.tags
}
