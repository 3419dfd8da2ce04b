################################################################################
# Network
################################################################################

locals {
  port = 6379
}

resource "aws_elasticache_subnet_group" "this" {
  name       = var.name
  subnet_ids = var.subnet_ids
  tags       = var.tags
}

resource "aws_security_group" "redis" {
  name        = "${var.name}-redis"
  description = "Redis ${var.name}: TLS on 6379 from the Tandem workloads only"
  vpc_id      = var.vpc_id
  tags        = merge(var.tags, { Name = "${var.name}-redis" })
}

resource "aws_vpc_security_group_ingress_rule" "redis" {
  for_each = var.allowed_security_group_ids

  security_group_id            = aws_security_group.redis.id
  description                  = "Redis from workload security group"
  ip_protocol                  = "tcp"
  from_port                    = local.port
  to_port                      = local.port
  referenced_security_group_id = each.value
}

################################################################################
# AUTH token in Secrets Manager
#
# The services read the token from REDIS_AUTH_SECRET_ID (a plain-string
# secret) and connect with rediss://. Nothing rotates it automatically. To
# rotate (docs/deploy.md, Day 2): replace random_password.auth and apply;
# auth_token_update_strategy = ROTATE adds the new token and keeps the old one
# valid while the pods restart and re-read the secret; then modify the group
# with the SET strategy and the new token, which makes the old one invalid.
################################################################################

resource "random_password" "auth" {
  length  = 64
  special = false
}

resource "aws_secretsmanager_secret" "auth" {
  # checkov:skip=CKV2_AWS_57:Rotation is not enabled: no rotation function is configured (Secrets Manager has none for ElastiCache AUTH tokens). The operator must rotate by hand as docs/deploy.md section 16 says: replace random_password.auth and apply, restart the workloads, then modify the replication group with the SET strategy, until which the old token stays valid.
  name                    = "${var.name}/redis/auth-token"
  description             = "AUTH token of the ElastiCache replication group ${var.name}"
  kms_key_id              = var.kms_key_arn
  recovery_window_in_days = 7
  tags                    = var.tags
}

resource "aws_secretsmanager_secret_version" "auth" {
  secret_id     = aws_secretsmanager_secret.auth.id
  secret_string = random_password.auth.result
}

################################################################################
# Replication group
################################################################################

resource "aws_cloudwatch_log_group" "slow_log" {
  name              = "/aws/elasticache/${var.name}/slow-log"
  retention_in_days = var.log_retention_days
  kms_key_id        = var.kms_key_arn
  tags              = var.tags
}

resource "aws_elasticache_replication_group" "this" {
  replication_group_id = var.name
  description          = "Tandem read-through cache ${var.name}"
  engine               = "redis"
  engine_version       = var.engine_version
  node_type            = var.node_type
  port                 = local.port
  num_cache_clusters   = var.num_cache_clusters

  automatic_failover_enabled = true
  multi_az_enabled           = true

  subnet_group_name  = aws_elasticache_subnet_group.this.name
  security_group_ids = [aws_security_group.redis.id]

  at_rest_encryption_enabled = true
  kms_key_id                 = var.kms_key_arn
  transit_encryption_enabled = true
  auth_token                 = random_password.auth.result
  auth_token_update_strategy = "ROTATE"
  auto_minor_version_upgrade = true
  apply_immediately          = false
  maintenance_window         = "sun:04:30-sun:05:30"
  snapshot_window            = "02:00-03:00"
  snapshot_retention_limit   = var.snapshot_retention_days

  log_delivery_configuration {
    destination      = aws_cloudwatch_log_group.slow_log.name
    destination_type = "cloudwatch-logs"
    log_format       = "json"
    log_type         = "slow-log"
  }

  tags = var.tags
}
