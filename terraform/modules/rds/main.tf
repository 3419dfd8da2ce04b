################################################################################
# Lookups
################################################################################

data "aws_caller_identity" "current" {}

data "aws_partition" "current" {}

data "aws_region" "current" {}

locals {
  partition = data.aws_partition.current.partition
  region    = data.aws_region.current.name
  account   = data.aws_caller_identity.current.account_id
  port      = 5432
}

################################################################################
# Network
################################################################################

resource "aws_db_subnet_group" "this" {
  name       = var.name
  subnet_ids = var.subnet_ids
  tags       = var.tags
}

resource "aws_security_group" "db" {
  name        = "${var.name}-postgres"
  description = "PostgreSQL ${var.name}: only from the workloads, the proxy and the rotation function"
  vpc_id      = var.vpc_id
  tags        = merge(var.tags, { Name = "${var.name}-postgres" })
}

resource "aws_vpc_security_group_ingress_rule" "db_from_workloads" {
  for_each = var.allowed_security_group_ids

  security_group_id            = aws_security_group.db.id
  description                  = "PostgreSQL from workload security group"
  ip_protocol                  = "tcp"
  from_port                    = local.port
  to_port                      = local.port
  referenced_security_group_id = each.value
}

resource "aws_vpc_security_group_ingress_rule" "db_from_proxy" {
  count = var.create_proxy ? 1 : 0

  security_group_id            = aws_security_group.db.id
  description                  = "PostgreSQL from the RDS Proxy"
  ip_protocol                  = "tcp"
  from_port                    = local.port
  to_port                      = local.port
  referenced_security_group_id = aws_security_group.proxy[0].id
}

resource "aws_vpc_security_group_ingress_rule" "db_from_rotation" {
  security_group_id            = aws_security_group.db.id
  description                  = "PostgreSQL from the secret rotation function"
  ip_protocol                  = "tcp"
  from_port                    = local.port
  to_port                      = local.port
  referenced_security_group_id = aws_security_group.rotation.id
}

################################################################################
# Parameter group
################################################################################

resource "aws_db_parameter_group" "this" {
  name_prefix = "${var.name}-pg16-"
  family      = "postgres16"
  description = "Tandem PostgreSQL 16: TLS only, connection and slow-query logging"

  # Reject any connection that is not TLS (the services use verify-full).
  parameter {
    name  = "rds.force_ssl"
    value = "1"
  }

  parameter {
    name  = "log_connections"
    value = "1"
  }

  parameter {
    name  = "log_disconnections"
    value = "1"
  }

  parameter {
    name  = "log_statement"
    value = "ddl"
  }

  parameter {
    name  = "log_min_duration_statement"
    value = "500"
  }

  parameter {
    name         = "shared_preload_libraries"
    value        = "pg_stat_statements"
    apply_method = "pending-reboot"
  }

  tags = var.tags

  lifecycle {
    create_before_destroy = true
  }
}

################################################################################
# Instance
################################################################################

data "aws_iam_policy_document" "monitoring_assume" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["monitoring.rds.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "monitoring" {
  name               = "${var.name}-rds-monitoring"
  assume_role_policy = data.aws_iam_policy_document.monitoring_assume.json
  tags               = var.tags
}

resource "aws_iam_role_policy_attachment" "monitoring" {
  role       = aws_iam_role.monitoring.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/service-role/AmazonRDSEnhancedMonitoringRole"
}

# Created ahead of the instance so the exported logs are encrypted and expire.
resource "aws_cloudwatch_log_group" "postgres" {
  for_each = toset(["postgresql", "upgrade"])

  name              = "/aws/rds/instance/${var.name}/${each.key}"
  retention_in_days = var.log_retention_days
  kms_key_id        = var.kms_key_arn
  tags              = var.tags
}

resource "aws_db_instance" "this" {
  identifier     = var.name
  engine         = "postgres"
  engine_version = var.engine_version
  instance_class = var.instance_class
  db_name        = var.database_name
  port           = local.port

  # RDS generates the master password, keeps it in Secrets Manager (encrypted
  # with our key) and rotates it every 7 days. Nobody ever sees it in state.
  username                      = var.master_username
  manage_master_user_password   = true
  master_user_secret_kms_key_id = var.kms_key_arn

  iam_database_authentication_enabled = true

  allocated_storage     = var.allocated_storage_gib
  max_allocated_storage = var.max_allocated_storage_gib
  storage_type          = "gp3"
  storage_encrypted     = true
  kms_key_id            = var.kms_key_arn

  multi_az               = var.multi_az
  db_subnet_group_name   = aws_db_subnet_group.this.name
  vpc_security_group_ids = [aws_security_group.db.id]
  publicly_accessible    = false
  parameter_group_name   = aws_db_parameter_group.this.name

  backup_retention_period   = var.backup_retention_days
  backup_window             = "02:00-03:00"
  maintenance_window        = "sun:03:30-sun:04:30"
  copy_tags_to_snapshot     = true
  deletion_protection       = var.deletion_protection
  skip_final_snapshot       = false
  final_snapshot_identifier = "${var.name}-final"

  auto_minor_version_upgrade = true
  apply_immediately          = false

  enabled_cloudwatch_logs_exports = ["postgresql", "upgrade"]
  monitoring_interval             = 30
  monitoring_role_arn             = aws_iam_role.monitoring.arn

  performance_insights_enabled          = true
  performance_insights_kms_key_id       = var.kms_key_arn
  performance_insights_retention_period = 7

  tags = var.tags

  depends_on = [aws_cloudwatch_log_group.postgres]
}

################################################################################
# Application secret (RDS JSON shape) and its rotation
#
# The RDS-managed master secret holds only username and password, but the
# services expect the full RDS shape (host, port, dbname too), and they must
# not run as the master user. This secret is for the application role; a
# Secrets Manager rotation function (AWS's single-user PostgreSQL rotation
# application) changes its password on a schedule.
################################################################################

resource "random_password" "app" {
  length  = 40
  special = false
}

resource "aws_secretsmanager_secret" "app" {
  name                    = "${var.name}/db/app"
  description             = "PostgreSQL credentials of ${var.app_username} on ${var.name} (RDS JSON shape, rotated)"
  kms_key_id              = var.kms_key_arn
  recovery_window_in_days = 7
  tags                    = var.tags
}

resource "aws_secretsmanager_secret_version" "app" {
  secret_id = aws_secretsmanager_secret.app.id
  secret_string = jsonencode({
    engine   = "postgres"
    host     = aws_db_instance.this.address
    port     = local.port
    dbname   = var.database_name
    username = var.app_username
    password = random_password.app.result
  })

  lifecycle {
    # After the first rotation the password in the secret is the truth.
    ignore_changes = [secret_string]
  }
}

resource "aws_security_group" "rotation" {
  # checkov:skip=CKV2_AWS_5:Attached to the rotation Lambda through the vpcSecurityGroupIds parameter of the SAR stack below, which the graph check cannot follow.
  name        = "${var.name}-secret-rotation"
  description = "Secret rotation function for ${var.name}: PostgreSQL and Secrets Manager only"
  vpc_id      = var.vpc_id
  tags        = merge(var.tags, { Name = "${var.name}-secret-rotation" })
}

resource "aws_vpc_security_group_egress_rule" "rotation_to_db" {
  security_group_id            = aws_security_group.rotation.id
  description                  = "PostgreSQL"
  ip_protocol                  = "tcp"
  from_port                    = local.port
  to_port                      = local.port
  referenced_security_group_id = aws_security_group.db.id
}

resource "aws_vpc_security_group_egress_rule" "rotation_to_endpoints" {
  security_group_id = aws_security_group.rotation.id
  description       = "HTTPS to the Secrets Manager VPC endpoint"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = var.vpc_cidr_block
}

# AWS publishes the rotation function in the Serverless Application Repository;
# the data source pins the version (latest when rotation_app_version is null)
# and tells which capabilities the stack needs.
data "aws_serverlessapplicationrepository_application" "rotation" {
  application_id   = "arn:${local.partition}:serverlessrepo:us-east-1:297356227824:applications/SecretsManagerRDSPostgreSQLRotationSingleUser"
  semantic_version = var.rotation_app_version
}

resource "aws_serverlessapplicationrepository_cloudformation_stack" "rotation" {
  name             = "${var.name}-db-app-rotation"
  application_id   = data.aws_serverlessapplicationrepository_application.rotation.application_id
  semantic_version = data.aws_serverlessapplicationrepository_application.rotation.semantic_version
  capabilities     = data.aws_serverlessapplicationrepository_application.rotation.required_capabilities

  parameters = {
    endpoint            = "https://secretsmanager.${local.region}.amazonaws.com"
    functionName        = "${var.name}-db-app-rotation"
    kmsKeyArn           = var.kms_key_arn
    vpcSubnetIds        = join(",", var.subnet_ids)
    vpcSecurityGroupIds = aws_security_group.rotation.id
  }

  tags = var.tags
}

resource "aws_secretsmanager_secret_rotation" "app" {
  secret_id           = aws_secretsmanager_secret.app.id
  rotation_lambda_arn = aws_serverlessapplicationrepository_cloudformation_stack.rotation.outputs["RotationLambdaARN"]

  rotation_rules {
    automatically_after_days = var.rotation_days
  }

  # The first rotation must wait until the bootstrap SQL created the role
  # (docs/deploy.md); rotate_immediately=false leaves that to the schedule.
  rotate_immediately = false

  depends_on = [aws_secretsmanager_secret_version.app]
}

################################################################################
# RDS Proxy (Lambda mode)
#
# Lambda scales to many short-lived connections; the proxy pools them. Clients
# authenticate with IAM tokens (rds-db:connect on the proxy user ARN), the proxy
# logs in to PostgreSQL with the application secret above.
################################################################################

resource "aws_security_group" "proxy" {
  # checkov:skip=CKV2_AWS_5:Attached to aws_db_proxy.this (vpc_security_group_ids); the count-indexed reference is not followed by the graph check.
  count = var.create_proxy ? 1 : 0

  name        = "${var.name}-rds-proxy"
  description = "RDS Proxy ${var.name}: from the Lambda functions, to PostgreSQL"
  vpc_id      = var.vpc_id
  tags        = merge(var.tags, { Name = "${var.name}-rds-proxy" })
}

resource "aws_vpc_security_group_ingress_rule" "proxy_from_clients" {
  for_each = var.create_proxy ? var.proxy_client_security_group_ids : {}

  security_group_id            = aws_security_group.proxy[0].id
  description                  = "PostgreSQL from proxy client"
  ip_protocol                  = "tcp"
  from_port                    = local.port
  to_port                      = local.port
  referenced_security_group_id = each.value
}

resource "aws_vpc_security_group_egress_rule" "proxy_to_db" {
  count = var.create_proxy ? 1 : 0

  security_group_id            = aws_security_group.proxy[0].id
  description                  = "PostgreSQL to the instance"
  ip_protocol                  = "tcp"
  from_port                    = local.port
  to_port                      = local.port
  referenced_security_group_id = aws_security_group.db.id
}

data "aws_iam_policy_document" "proxy_assume" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["rds.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "proxy" {
  count = var.create_proxy ? 1 : 0

  name               = "${var.name}-rds-proxy"
  assume_role_policy = data.aws_iam_policy_document.proxy_assume.json
  tags               = var.tags
}

data "aws_iam_policy_document" "proxy" {
  statement {
    actions   = ["secretsmanager:GetSecretValue"]
    resources = [aws_secretsmanager_secret.app.arn]
  }

  statement {
    actions   = ["kms:Decrypt"]
    resources = [var.kms_key_arn]

    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values   = ["secretsmanager.${local.region}.amazonaws.com"]
    }
  }
}

resource "aws_iam_role_policy" "proxy" {
  count = var.create_proxy ? 1 : 0

  name   = "read-app-secret"
  role   = aws_iam_role.proxy[0].id
  policy = data.aws_iam_policy_document.proxy.json
}

resource "aws_db_proxy" "this" {
  count = var.create_proxy ? 1 : 0

  name                   = var.name
  engine_family          = "POSTGRESQL"
  require_tls            = true
  idle_client_timeout    = 1800
  role_arn               = aws_iam_role.proxy[0].arn
  vpc_subnet_ids         = var.subnet_ids
  vpc_security_group_ids = [aws_security_group.proxy[0].id]

  auth {
    auth_scheme               = "SECRETS"
    description               = "${var.app_username} via IAM token"
    iam_auth                  = "REQUIRED"
    client_password_auth_type = "POSTGRES_SCRAM_SHA_256"
    secret_arn                = aws_secretsmanager_secret.app.arn
  }

  tags = var.tags

  depends_on = [aws_iam_role_policy.proxy]
}

resource "aws_db_proxy_default_target_group" "this" {
  count = var.create_proxy ? 1 : 0

  db_proxy_name = aws_db_proxy.this[0].name

  connection_pool_config {
    max_connections_percent      = 60
    max_idle_connections_percent = 20
    connection_borrow_timeout    = 5
  }
}

resource "aws_db_proxy_target" "this" {
  count = var.create_proxy ? 1 : 0

  db_proxy_name          = aws_db_proxy.this[0].name
  target_group_name      = aws_db_proxy_default_target_group.this[0].name
  db_instance_identifier = aws_db_instance.this.identifier
}

locals {
  # arn:aws:rds:<region>:<account>:db-proxy:prx-0123abcd -> prx-0123abcd
  proxy_resource_id = var.create_proxy ? element(split(":", aws_db_proxy.this[0].arn), 6) : null
}
