################################################################################
# Lookups
################################################################################

data "aws_partition" "current" {}

data "aws_region" "current" {}

locals {
  partition = data.aws_partition.current.partition
}

################################################################################
# Network
################################################################################

resource "aws_security_group" "function" {
  name        = "${var.function_name}-lambda"
  description = "Lambda ${var.function_name}: PostgreSQL via the proxy, Redis, HTTPS"
  vpc_id      = var.vpc_id
  tags        = merge(var.tags, { Name = "${var.function_name}-lambda" })
}

resource "aws_vpc_security_group_egress_rule" "postgres" {
  security_group_id            = aws_security_group.function.id
  description                  = "PostgreSQL through the RDS Proxy"
  ip_protocol                  = "tcp"
  from_port                    = 5432
  to_port                      = 5432
  referenced_security_group_id = var.database_security_group_id
}

resource "aws_vpc_security_group_egress_rule" "redis" {
  security_group_id            = aws_security_group.function.id
  description                  = "Redis"
  ip_protocol                  = "tcp"
  from_port                    = 6379
  to_port                      = 6379
  referenced_security_group_id = var.redis_security_group_id
}

# The Cognito JWKS endpoint is public; AWS APIs go through the VPC endpoints.
resource "aws_vpc_security_group_egress_rule" "https" {
  security_group_id = aws_security_group.function.id
  description       = "HTTPS: VPC endpoints and the JWKS URL through NAT"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = "0.0.0.0/0"
}

################################################################################
# Execution role
################################################################################

data "aws_iam_policy_document" "assume" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["lambda.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "function" {
  name               = var.function_name
  assume_role_policy = data.aws_iam_policy_document.assume.json
  tags               = var.tags
}

# ENI management for VPC functions; the actions support no resource scoping.
resource "aws_iam_role_policy_attachment" "vpc_access" {
  role       = aws_iam_role.function.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/service-role/AWSLambdaVPCAccessExecutionRole"
}

resource "aws_iam_role_policy_attachment" "xray" {
  role       = aws_iam_role.function.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/AWSXRayDaemonWriteAccess"
}

data "aws_iam_policy_document" "function" {
  statement {
    sid       = "WriteOwnLogs"
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents"]
    resources = ["${aws_cloudwatch_log_group.function.arn}:*"]
  }

  statement {
    sid       = "ReadOwnSecrets"
    actions   = ["secretsmanager:GetSecretValue"]
    resources = var.secret_arns
  }

  # Only for reading the secrets above: Secrets Manager decrypts them with the
  # key on the function's behalf. The environment variables need no IAM
  # permission (Lambda decrypts them through the grant it creates on the key
  # for the execution role), and the function's own code never calls KMS.
  statement {
    sid       = "DecryptSecretsOnly"
    actions   = ["kms:Decrypt"]
    resources = [var.kms_key_arn]

    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values   = ["secretsmanager.${data.aws_region.current.name}.amazonaws.com"]
    }
  }

  statement {
    sid       = "ConnectThroughProxyWithIamToken"
    actions   = ["rds-db:connect"]
    resources = var.rds_db_user_arns
  }
}

resource "aws_iam_role_policy" "function" {
  name   = "tandem-function"
  role   = aws_iam_role.function.id
  policy = data.aws_iam_policy_document.function.json
}

################################################################################
# Function
################################################################################

resource "aws_cloudwatch_log_group" "function" {
  name              = "/aws/lambda/${var.function_name}"
  retention_in_days = var.log_retention_days
  kms_key_id        = var.kms_key_arn
  tags              = var.tags
}

resource "aws_lambda_function" "this" {
  # checkov:skip=CKV_AWS_116:Invoked synchronously by the ALB; a failed request is answered to the client, there is no async event to dead-letter.
  # checkov:skip=CKV_AWS_272:Code signing is not configured: Lambda runs whatever zip terraform apply uploads from lambda_zip_paths, or anyone with lambda:UpdateFunctionCode deploys; nothing verifies it came from the release workflow. Enabling it needs an AWS Signer profile, signed packages in S3 and an aws_lambda_code_signing_config.
  function_name = var.function_name
  description   = var.description
  role          = aws_iam_role.function.arn

  # cargo lambda produces a `bootstrap` executable for the OS-only runtime.
  runtime       = "provided.al2023"
  handler       = "bootstrap"
  architectures = ["arm64"]
  filename      = var.zip_path
  # try(): plan works before the zip is built; apply needs the file.
  source_code_hash = try(filebase64sha256(var.zip_path), null)

  memory_size                    = var.memory_mb
  timeout                        = var.timeout_seconds
  reserved_concurrent_executions = var.reserved_concurrency
  kms_key_arn                    = var.kms_key_arn

  environment {
    variables = var.environment
  }

  vpc_config {
    subnet_ids         = var.subnet_ids
    security_group_ids = [aws_security_group.function.id]
  }

  tracing_config {
    mode = "Active"
  }

  tags = var.tags

  depends_on = [
    aws_cloudwatch_log_group.function,
    aws_iam_role_policy.function,
    aws_iam_role_policy_attachment.vpc_access,
  ]
}

################################################################################
# ALB target
################################################################################

# -fn: the ALB module's pod target group already uses the plain name.
resource "aws_lb_target_group" "this" {
  name        = "${var.function_name}-fn"
  target_type = "lambda"

  # Each health check is an invocation: keep the interval long.
  health_check {
    enabled             = true
    path                = "/readyz"
    matcher             = "200"
    interval            = 35
    timeout             = 30
    healthy_threshold   = 2
    unhealthy_threshold = 2
  }

  tags = var.tags
}

resource "aws_lambda_permission" "alb" {
  statement_id  = "AllowInvokeFromAlbTargetGroup"
  action        = "lambda:InvokeFunction"
  function_name = aws_lambda_function.this.function_name
  principal     = "elasticloadbalancing.amazonaws.com"
  source_arn    = aws_lb_target_group.this.arn
}

resource "aws_lb_target_group_attachment" "this" {
  target_group_arn = aws_lb_target_group.this.arn
  target_id        = aws_lambda_function.this.arn

  depends_on = [aws_lambda_permission.alb]
}
