################################################################################
# One Tandem region
#
# Everything a region runs on its own: key, network, EKS cluster, PostgreSQL,
# Redis, the workloads' IRSA roles, the Lambda functions of Lambda mode and the
# load balancer. terraform/deployments/tandem instantiates it twice, the same
# way: both regions run the Write API, the Read API, the outbox relay (which
# publishes this region's outbox to its own topic) and the consumer (which
# applies the other region's topic). Which region takes writes is not decided
# here: it is the write region recorded in both databases, moved by
# `tandem switchover`; a follower's Write API forwards writes to the other
# region's (write_function_environment, the EKS overlays).
#
# Optionally the consumer runs as a Lambda function fed by Kafka
# (apply_lambda).
#
# What spans both regions stays in the deployment: MSK (Region 1, with secrets
# replicated to Region 2), ECR replication, the VPC peering and Route 53.
################################################################################

locals {
  lambda       = var.backend == "lambda"
  apply_lambda = var.apply_lambda != null

  # "Region 1" for region1: the functions' descriptions.
  label = "Region ${trimprefix(var.key, "region")}"

  # Target group names are <name>-write / <name>-read (modules/alb).
  target_group_arn_patterns = ["arn:aws:elasticloadbalancing:${var.aws_region}:${var.account_id}:targetgroup/${var.name}-*/*"]

  # The Lambda functions that reach the RDS Proxy and Redis, keyed by role.
  proxy_clients = merge(
    local.lambda ? { write = module.lambda_write[0].security_group_id } : {},
    local.lambda ? { read = module.lambda_read[0].security_group_id } : {},
    local.apply_lambda ? { apply = module.lambda_apply[0].security_group_id } : {},
  )
}

################################################################################
# Key and network
################################################################################

module "kms" {
  source = "../kms"

  name = var.name
  tags = var.tags
}

module "network" {
  source = "../network"

  name                 = var.name
  cidr_block           = var.network.cidr_block
  availability_zones   = var.network.availability_zones
  public_subnet_cidrs  = var.network.public_subnet_cidrs
  private_subnet_cidrs = var.network.private_subnet_cidrs
  single_nat_gateway   = var.single_nat_gateway
  eks_cluster_name     = var.name
  kms_key_arn          = module.kms.key_arn
  tags                 = var.tags
}

################################################################################
# EKS cluster
################################################################################

module "eks" {
  source = "../eks"

  cluster_name              = var.name
  kubernetes_version        = var.kubernetes_version
  vpc_id                    = module.network.vpc_id
  subnet_ids                = module.network.private_subnet_ids
  endpoint_public_access    = var.eks_endpoint_public_access
  public_access_cidrs       = var.eks_public_access_cidrs
  admin_principal_arns      = var.eks_admin_principal_arns
  node_groups               = var.eks_node_groups
  kms_key_arn               = module.kms.key_arn
  target_group_arn_patterns = local.target_group_arn_patterns
  tags                      = var.tags
}

################################################################################
# PostgreSQL and Redis
################################################################################

module "rds" {
  source = "../rds"

  name                            = var.name
  vpc_id                          = module.network.vpc_id
  vpc_cidr_block                  = module.network.vpc_cidr_block
  subnet_ids                      = module.network.private_subnet_ids
  allowed_security_group_ids      = { eks = module.eks.cluster_security_group_id }
  proxy_client_security_group_ids = local.proxy_clients
  instance_class                  = var.db_instance_class
  multi_az                        = var.db_multi_az
  deletion_protection             = var.deletion_protection
  create_proxy                    = local.lambda || local.apply_lambda
  kms_key_arn                     = module.kms.key_arn
  tags                            = var.tags
}

module "elasticache" {
  source = "../elasticache"

  name                       = var.name
  vpc_id                     = module.network.vpc_id
  subnet_ids                 = module.network.private_subnet_ids
  allowed_security_group_ids = merge({ eks = module.eks.cluster_security_group_id }, local.proxy_clients)
  node_type                  = var.redis_node_type
  num_cache_clusters         = var.redis_num_cache_clusters
  kms_key_arn                = module.kms.key_arn
  tags                       = var.tags
}

################################################################################
# IRSA roles of the workloads
################################################################################

module "iam" {
  source = "../iam"

  name_prefix       = var.name
  oidc_provider_arn = module.eks.oidc_provider_arn
  oidc_issuer       = module.eks.oidc_issuer
  namespace         = var.kubernetes_namespace
  kms_key_arn       = module.kms.key_arn
  tags              = var.tags

  # The same four in every region; the relay and the consumer each read their
  # own Kafka user's secret (one user per region and direction, so a relay can
  # write only its own region's topic).
  workloads = {
    write = {
      service_account = var.service_accounts.write
      secret_arns     = [module.rds.app_secret_arn, module.elasticache.auth_secret_arn]
    }
    read = {
      service_account = var.service_accounts.read
      secret_arns     = [module.rds.app_secret_arn, module.elasticache.auth_secret_arn]
    }
    relay = {
      service_account = var.service_accounts.relay
      secret_arns     = [module.rds.app_secret_arn, var.kafka_secret_arns.relay]
    }
    consumer = {
      service_account = var.service_accounts.consumer
      secret_arns     = [module.rds.app_secret_arn, module.elasticache.auth_secret_arn, var.kafka_secret_arns.consumer]
    }
  }
}

################################################################################
# Lambda mode: Write and Read functions behind the ALB, through RDS Proxy
################################################################################

locals {
  # What every function of this region adds to var.function_environment: its
  # region, the database through the proxy, the cache.
  region_environment = {
    TANDEM_REGION        = var.key
    DATABASE_IAM_HOST    = module.rds.proxy_endpoint
    DATABASE_IAM_USER    = module.rds.app_username
    DATABASE_IAM_DBNAME  = module.rds.database_name
    REDIS_URL            = module.elasticache.redis_url
    REDIS_AUTH_SECRET_ID = module.elasticache.auth_secret_name
  }
}

module "lambda_write" {
  source = "../lambda"
  count  = local.lambda ? 1 : 0

  function_name = "${var.name}-write"
  description   = "Tandem Write API (${local.label})"
  zip_path      = var.lambda_zip_paths["write"]
  environment = merge(var.function_environment, var.api_environment, var.write_function_environment, local.region_environment, {
    TANDEM_MIGRATE_ON_START = "true"
  })
  vpc_id                     = module.network.vpc_id
  vpc_cidr_block             = module.network.vpc_cidr_block
  subnet_ids                 = module.network.private_subnet_ids
  database_security_group_id = module.rds.proxy_security_group_id
  redis_security_group_id    = module.elasticache.security_group_id
  secret_arns                = [module.elasticache.auth_secret_arn]
  rds_db_user_arns           = [module.rds.proxy_db_user_arn]
  kms_key_arn                = module.kms.key_arn
  tags                       = var.tags
}

module "lambda_read" {
  source = "../lambda"
  count  = local.lambda ? 1 : 0

  function_name = "${var.name}-read"
  description   = "Tandem Read API (${local.label})"
  zip_path      = var.lambda_zip_paths["read"]
  environment = merge(var.function_environment, var.api_environment, var.read_function_environment, local.region_environment, {
    TANDEM_MIGRATE_ON_START = "false"
  })
  vpc_id                     = module.network.vpc_id
  vpc_cidr_block             = module.network.vpc_cidr_block
  subnet_ids                 = module.network.private_subnet_ids
  database_security_group_id = module.rds.proxy_security_group_id
  redis_security_group_id    = module.elasticache.security_group_id
  secret_arns                = [module.elasticache.auth_secret_arn]
  rds_db_user_arns           = [module.rds.proxy_db_user_arn]
  kms_key_arn                = module.kms.key_arn
  tags                       = var.tags
}

################################################################################
# The consumer as a Lambda function (apply_lambda set)
#
# A self-managed Kafka event source mapping in this region reads the other
# region's MSK topic (across the peering from Region 2), as this region's
# consumer SCRAM user, in the consumer pod's group; the function applies each
# batch to this region's PostgreSQL (through the RDS Proxy) and Redis. In this
# mode the pod must not run: render the overlay with
# eks/components/region2-apply-lambda (docs/deploy.md).
################################################################################

module "lambda_apply" {
  source = "../lambda_kafka"
  count  = local.apply_lambda ? 1 : 0

  function_name = "${var.name}-apply"
  description   = "Tandem ${local.label} apply (the other region's Kafka change events to ${local.label}'s PostgreSQL and Redis)"
  zip_path      = var.lambda_zip_paths["apply"]
  environment = merge(var.function_environment, local.region_environment, {
    KAFKA_TOPIC            = var.apply_lambda.topic
    KAFKA_TOPIC_PARTITIONS = tostring(var.apply_lambda.topic_partitions)
  })
  vpc_id                     = module.network.vpc_id
  subnet_ids                 = module.network.private_subnet_ids
  database_security_group_id = module.rds.proxy_security_group_id
  redis_security_group_id    = module.elasticache.security_group_id
  secret_arns                = [module.elasticache.auth_secret_arn]
  rds_db_user_arns           = [module.rds.proxy_db_user_arn]
  kms_key_arn                = module.kms.key_arn
  # At least one concurrent invocation per partition, and a few for retries.
  reserved_concurrency = var.apply_lambda.topic_partitions + 2

  kafka_bootstrap_servers  = var.apply_lambda.bootstrap_servers
  kafka_broker_cidr_blocks = var.apply_lambda.broker_cidr_blocks
  kafka_topic              = var.apply_lambda.topic
  kafka_consumer_group     = var.apply_lambda.consumer_group
  kafka_scram_secret_arn   = var.apply_lambda.scram_secret_arn
  tags                     = var.tags
}

################################################################################
# Load balancer (method routing, HTTPS only, WAF)
################################################################################

module "alb" {
  source = "../alb"

  name                  = var.name
  vpc_id                = module.network.vpc_id
  vpc_cidr_block        = module.network.vpc_cidr_block
  public_subnet_ids     = module.network.public_subnet_ids
  certificate_arn       = var.certificate_arn
  backend               = var.backend
  pod_security_group_id = module.eks.cluster_security_group_id
  lambda_target_group_arns = local.lambda ? {
    write = module.lambda_write[0].target_group_arn
    read  = module.lambda_read[0].target_group_arn
  } : {}
  rate_limit_exempt_ips = var.peer_egress_ips
  deletion_protection   = var.deletion_protection
  kms_key_arn           = module.kms.key_arn
  tags                  = var.tags
}
