################################################################################
# Amazon MSK in Region 1, reached from Region 2 over VPC peering
#
# Both directions use this one cluster: each region's relay publishes its
# outbox to its own topic (tandem.documents for Region 1, tandem.documents.region2
# for Region 2) and the other region's consumer reads it. Region 2's relay and
# consumer reach the brokers across the peering.
#
# Why one cluster and peering rather than MSK Replicator: Replicator would need
# a second three-broker cluster in Region 2 plus the replicator's hourly and
# per-GB charges, requires IAM access control on both clusters (the services
# use SASL/SCRAM), and renames or re-offsets topics, so the consumers' offsets
# would not carry over anyway. The cost of the choice: Region 2's Kafka
# traffic crosses regions (inter-region transfer), it depends on the peering
# connection, and while Region 1 is down Region 2's writes wait in its outbox
# (the transactional outbox keeps them; its relay publishes them once the
# brokers are back).
################################################################################

data "aws_caller_identity" "current" {}

data "aws_partition" "current" {}

locals {
  sasl_scram_port = 9096

  # SCRAM user names, and the principals Kafka's authorizer sees for them
  # (the ACLs of modules/msk_acls name these).
  scram_usernames = { for user in var.scram_users : user => "tandem-${user}" }
}

################################################################################
# Network
################################################################################

resource "aws_security_group" "brokers" {
  name        = "${var.name}-msk"
  description = "MSK ${var.name}: SASL/SCRAM over TLS from the two Tandem VPCs"
  vpc_id      = var.vpc_id
  tags        = merge(var.tags, { Name = "${var.name}-msk" })
}

resource "aws_vpc_security_group_ingress_rule" "clients" {
  for_each = toset(var.client_cidr_blocks)

  security_group_id = aws_security_group.brokers.id
  description       = "Kafka SASL/SCRAM TLS from ${each.value}"
  ip_protocol       = "tcp"
  from_port         = local.sasl_scram_port
  to_port           = local.sasl_scram_port
  cidr_ipv4         = each.value
}

################################################################################
# Broker configuration
################################################################################

# Topics are created explicitly (the relay calls CreateTopics at start-up),
# never implicitly by a produce or fetch with a mistyped name.
#
# allow.everyone.if.no.acl.found=false: a principal may use a topic, a group
# or the cluster only where a Kafka ACL allows it (MSK's default, true, lets
# every authenticated SCRAM user do anything that has no ACL yet). The ACLs
# are applied by terraform/deployments/tandem-kafka-acls (modules/msk_acls):
# relay, consumer and the admin that manages them. MSK's brokers are super
# users and need none. acl_bootstrap leaves it true for the first apply of a
# new cluster only, because nobody can create the first ACL on a cluster that
# already denies by default (docs/deploy.md, "Kafka ACLs").
#
# message.max.bytes and replica.fetch.max.bytes come from one value, which
# must equal KAFKA_MAX_MESSAGE_BYTES in shared/core/src/limits.rs (the producer's,
# the topic's and the consumer's limit).
resource "aws_msk_configuration" "this" {
  name           = "${var.name}-config"
  kafka_versions = [var.kafka_version]
  description    = "Tandem: explicit topics, ACLs enforced, three replicas, two in sync"

  server_properties = <<-EOT
    auto.create.topics.enable=false
    allow.everyone.if.no.acl.found=${var.acl_bootstrap ? "true" : "false"}
    default.replication.factor=3
    min.insync.replicas=2
    num.partitions=6
    unclean.leader.election.enable=false
    log.retention.hours=168
    message.max.bytes=${var.max_message_bytes}
    replica.fetch.max.bytes=${var.max_message_bytes}
  EOT
}

################################################################################
# Cluster
################################################################################

resource "aws_cloudwatch_log_group" "brokers" {
  name              = "/aws/msk/${var.name}"
  retention_in_days = var.log_retention_days
  kms_key_id        = var.kms_key_arn
  tags              = var.tags
}

resource "aws_msk_cluster" "this" {
  cluster_name           = var.name
  kafka_version          = var.kafka_version
  number_of_broker_nodes = length(var.subnet_ids) * var.brokers_per_az
  enhanced_monitoring    = "PER_TOPIC_PER_BROKER"

  broker_node_group_info {
    instance_type   = var.broker_instance_type
    client_subnets  = var.subnet_ids
    security_groups = [aws_security_group.brokers.id]

    storage_info {
      ebs_storage_info {
        volume_size = var.broker_volume_size_gib
      }
    }
  }

  encryption_info {
    encryption_at_rest_kms_key_arn = var.kms_key_arn

    encryption_in_transit {
      client_broker = "TLS"
      in_cluster    = true
    }
  }

  client_authentication {
    unauthenticated = false

    sasl {
      scram = true
      iam   = false
    }
  }

  configuration_info {
    arn      = aws_msk_configuration.this.arn
    revision = aws_msk_configuration.this.latest_revision
  }

  logging_info {
    broker_logs {
      cloudwatch_logs {
        enabled   = true
        log_group = aws_cloudwatch_log_group.brokers.name
      }
    }
  }

  tags = var.tags
}

################################################################################
# SASL/SCRAM credentials
#
# MSK reads SCRAM users only from secrets whose name starts with AmazonMSK_ and
# that are encrypted with a customer managed key. One user per workload (relay,
# consumer, per direction) and one, admin, that only manages the ACLs (Alter on
# the cluster); no workload role may read the admin secret.
################################################################################

resource "random_password" "scram" {
  for_each = toset(var.scram_users)

  length  = 40
  special = false
}

resource "aws_secretsmanager_secret" "scram" {
  # checkov:skip=CKV2_AWS_57:Rotation is not enabled: no rotation function is configured (MSK provides none for SCRAM secrets). The operator must rotate by hand as docs/deploy.md section 16 says: replace random_password.scram for the user, apply, then restart the workload, which reads the secret only when it creates a Kafka client.
  for_each = toset(var.scram_users)

  name                    = "AmazonMSK_${var.name}_${each.key}"
  description             = "SASL/SCRAM-SHA-512 credentials of the ${each.key} on MSK ${var.name}"
  kms_key_id              = var.kms_key_arn
  recovery_window_in_days = 7
  tags                    = var.tags

  # Region 2's consumer and relay read their credentials from a replica in
  # their own region: no cross-region Secrets Manager call on start-up.
  dynamic "replica" {
    for_each = var.replica_region != null && contains(var.replicated_users, each.key) ? [var.replica_region] : []

    content {
      region     = replica.value
      kms_key_id = var.replica_kms_key_arn
    }
  }
}

resource "aws_secretsmanager_secret_version" "scram" {
  for_each = toset(var.scram_users)

  secret_id = aws_secretsmanager_secret.scram[each.key].id
  secret_string = jsonencode({
    username = local.scram_usernames[each.key]
    password = random_password.scram[each.key].result
  })
}

data "aws_iam_policy_document" "scram_secret" {
  for_each = toset(var.scram_users)

  statement {
    sid       = "AWSKafkaResourcePolicy"
    actions   = ["secretsmanager:GetSecretValue"]
    resources = [aws_secretsmanager_secret.scram[each.key].arn]

    principals {
      type        = "Service"
      identifiers = ["kafka.amazonaws.com"]
    }
  }
}

resource "aws_secretsmanager_secret_policy" "scram" {
  for_each = toset(var.scram_users)

  secret_arn = aws_secretsmanager_secret.scram[each.key].arn
  policy     = data.aws_iam_policy_document.scram_secret[each.key].json
}

resource "aws_msk_scram_secret_association" "this" {
  cluster_arn     = aws_msk_cluster.this.arn
  secret_arn_list = [for user in var.scram_users : aws_secretsmanager_secret.scram[user].arn]

  depends_on = [aws_secretsmanager_secret_version.scram, aws_secretsmanager_secret_policy.scram]
}
