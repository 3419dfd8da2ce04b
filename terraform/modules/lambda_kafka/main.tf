################################################################################
# A Lambda function fed by a Kafka event source mapping
#
# Region 2's apply (tandem-region2-apply-lambda) behind a *self-managed* Kafka
# event source mapping pointed at the MSK brokers. An MSK-type mapping names the
# cluster by ARN and puts its pollers in the cluster's own subnets: it only works
# in the cluster's Region, and the cluster lives in Region 1. The self-managed
# type reaches the same brokers across the VPC peering from Region 2's subnets,
# with the same SASL/SCRAM user the consumer pod uses, and delivers the same
# event (eventSource "SelfManagedKafka" instead of "aws:kafka").
#
# Error handling (retries, partial batch responses, the on-failure
# destination) needs the mapping's provisioned mode: at least one event poller
# unit is billed per hour.
################################################################################

data "aws_partition" "current" {}

data "aws_region" "current" {}

locals {
  partition = data.aws_partition.current.partition
}

################################################################################
# Network: the function's ENIs and the event source's pollers
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

# AWS APIs (Secrets Manager for the Redis AUTH token, RDS IAM tokens need none).
resource "aws_vpc_security_group_egress_rule" "https" {
  security_group_id = aws_security_group.function.id
  description       = "HTTPS: VPC endpoints and AWS APIs through NAT"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = "0.0.0.0/0"
}

# The event source mapping's pollers get ENIs in the subnets below with this
# group. AWS asks for: inbound on the broker port from the group itself,
# outbound on the broker port, and outbound HTTPS for Lambda, STS and Secrets
# Manager (through the NAT gateways).
resource "aws_security_group" "event_source" {
  # checkov:skip=CKV2_AWS_5:Attached by the event source mapping below, whose VPC_SECURITY_GROUP source access configuration names it by id in a string checkov does not follow.
  name        = "${var.function_name}-kafka-pollers"
  description = "Kafka event source of ${var.function_name}: MSK brokers over the peering, AWS APIs"
  vpc_id      = var.vpc_id
  tags        = merge(var.tags, { Name = "${var.function_name}-kafka-pollers" })
}

resource "aws_vpc_security_group_ingress_rule" "pollers_self" {
  security_group_id            = aws_security_group.event_source.id
  description                  = "Kafka broker port from the event source's own ENIs (AWS requirement)"
  ip_protocol                  = "tcp"
  from_port                    = var.kafka_broker_port
  to_port                      = var.kafka_broker_port
  referenced_security_group_id = aws_security_group.event_source.id
}

resource "aws_vpc_security_group_egress_rule" "brokers" {
  for_each = toset(var.kafka_broker_cidr_blocks)

  security_group_id = aws_security_group.event_source.id
  description       = "Kafka brokers (SASL/SCRAM over TLS)"
  ip_protocol       = "tcp"
  from_port         = var.kafka_broker_port
  to_port           = var.kafka_broker_port
  cidr_ipv4         = each.value
}

resource "aws_vpc_security_group_egress_rule" "pollers_https" {
  security_group_id = aws_security_group.event_source.id
  description       = "HTTPS: Lambda, STS and Secrets Manager through NAT"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = "0.0.0.0/0"
}

################################################################################
# Discarded batches
################################################################################

# What the event source gives up on (after maximum_retry_attempts) is described
# here: topic, partition and offsets, not the records (they stay in Kafka until
# its retention ends). Nothing should ever arrive: the function dead-letters
# poison itself and reports only transient failures. A message here means
# Region 2 misses those events until `tandem-outbox-relay replay --since`
# republishes them; alarm on ApproximateNumberOfMessagesVisible > 0.
resource "aws_sqs_queue" "discarded" {
  name                              = "${var.function_name}-discarded"
  message_retention_seconds         = 1209600
  kms_master_key_id                 = var.kms_key_arn
  kms_data_key_reuse_period_seconds = 3600
  tags                              = var.tags
}

################################################################################
# Execution role (the function's, and the event source's: it reads the SCRAM
# secret, manages the pollers' ENIs and sends to the on-failure queue with it)
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

# ENI management for the function and the pollers; the actions support no
# resource scoping.
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

  # The Redis AUTH token (the function) and the Kafka SCRAM credentials (the
  # event source).
  statement {
    sid       = "ReadOwnSecrets"
    actions   = ["secretsmanager:GetSecretValue"]
    resources = concat(var.secret_arns, [var.kafka_scram_secret_arn])
  }

  # Only for reading the secrets above: Secrets Manager decrypts them with the
  # key on the role's behalf.
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

  # The event source's pollers describe the network they attach to; these
  # read-only actions support no resource scoping.
  statement {
    sid       = "DescribeNetworkForEventSource"
    actions   = ["ec2:DescribeVpcs", "ec2:DescribeSubnets", "ec2:DescribeSecurityGroups"]
    resources = ["*"]
  }

  statement {
    sid       = "SendDiscardedBatches"
    actions   = ["sqs:SendMessage"]
    resources = [aws_sqs_queue.discarded.arn]
  }

  # Only through SQS, for the queue's encryption.
  statement {
    sid       = "EncryptDiscardedBatchesOnly"
    actions   = ["kms:GenerateDataKey", "kms:Decrypt"]
    resources = [var.kms_key_arn]

    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values   = ["sqs.${data.aws_region.current.name}.amazonaws.com"]
    }
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
  # checkov:skip=CKV_AWS_116:Invoked synchronously by its event source mapping, never asynchronously: there is no async event to dead-letter. Poison records go to Region 2's dead_letters table, and batches the event source gives up on go to its on-failure queue (aws_sqs_queue.discarded).
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
# Event source mapping
################################################################################

resource "aws_lambda_event_source_mapping" "kafka" {
  function_name = aws_lambda_function.this.arn
  enabled       = var.event_source_enabled
  topics        = [var.kafka_topic]

  self_managed_event_source {
    endpoints = {
      KAFKA_BOOTSTRAP_SERVERS = var.kafka_bootstrap_servers
    }
  }

  # The consumer pod's group, on purpose: the pod commits the positions it
  # applied there (for Kafka's lag tooling), so a mapping created when Region 2
  # switches from the pod to Lambda starts where the pod was, and Kafka's
  # starting_position below only applies to a group that has none.
  self_managed_kafka_event_source_config {
    consumer_group_id = var.kafka_consumer_group
  }

  # TRIM_HORIZON, never LATEST: with no committed position (a new group) the
  # mapping reads the whole retained topic. The event ids and version guards
  # make the re-read harmless; LATEST would skip every event published before
  # the mapping existed (until each document's next write).
  starting_position = "TRIM_HORIZON"

  batch_size = var.batch_size
  # 0 leaves the Kafka default of 500 ms (the provider sends no value for 0, and
  # once set in whole seconds it cannot go back below 1 s).
  maximum_batching_window_in_seconds = var.maximum_batching_window_seconds

  # The function reports, per partition, the records from the first one it
  # could not apply (a transient database failure); Lambda retries exactly
  # those and commits the rest.
  function_response_types        = ["ReportBatchItemFailures"]
  bisect_batch_on_function_error = false
  maximum_retry_attempts         = var.maximum_retry_attempts
  maximum_record_age_in_seconds  = -1

  destination_config {
    on_failure {
      destination_arn = aws_sqs_queue.discarded.arn
    }
  }

  provisioned_poller_config {
    minimum_pollers = var.minimum_pollers
    maximum_pollers = var.maximum_pollers
  }

  source_access_configuration {
    type = "SASL_SCRAM_512_AUTH"
    uri  = var.kafka_scram_secret_arn
  }

  dynamic "source_access_configuration" {
    for_each = toset(var.subnet_ids)

    content {
      type = "VPC_SUBNET"
      uri  = "subnet:${source_access_configuration.value}"
    }
  }

  source_access_configuration {
    type = "VPC_SECURITY_GROUP"
    uri  = "security_group:${aws_security_group.event_source.id}"
  }

  depends_on = [aws_iam_role_policy.function, aws_iam_role_policy_attachment.vpc_access]
}
