################################################################################
# Kafka ACLs of the Tandem topics
#
# One stream per direction (var.streams, keyed by the region whose outbox the
# topic carries): that region's relay writes it, the other region's consumer
# reads it. With allow.everyone.if.no.acl.found=false (modules/msk) a
# principal may do only what an ACL below allows, so Region 1's relay cannot
# write Region 2's topic and the reverse. Every ACL is literal (one named
# resource), allows from any host (the security group limits the hosts) and is
# an Allow:
#
#   admin     Alter on the cluster: create, list and delete ACLs (Alter implies
#             Describe). Nothing else; it is not a workload.
#   relay     Write and Describe on the topic (an idempotent producer needs no
#             IdempotentWrite on the cluster since Kafka 3.0: Write on a topic
#             implies it); Create on the topic, because it calls CreateTopics
#             at start-up and after a broker lost its data, and Kafka checks
#             Create before it answers "already exists".
#   consumer  Read and Describe on the topic (fetch, ListOffsets for its lag),
#             Read on its group (offset commits for Kafka's lag tooling),
#             Create on the topic (it waits at start-up until CreateTopics
#             succeeds or answers "already exists").
################################################################################

locals {
  # <stream>_<what>, e.g. region1_relay_topic_write.
  workload_acls = merge([
    for key, stream in var.streams : {
      "${key}_relay_topic_write"       = { principal = stream.relay_principal, type = "Topic", name = stream.topic, operation = "Write" }
      "${key}_relay_topic_describe"    = { principal = stream.relay_principal, type = "Topic", name = stream.topic, operation = "Describe" }
      "${key}_relay_topic_create"      = { principal = stream.relay_principal, type = "Topic", name = stream.topic, operation = "Create" }
      "${key}_consumer_topic_read"     = { principal = stream.consumer_principal, type = "Topic", name = stream.topic, operation = "Read" }
      "${key}_consumer_topic_describe" = { principal = stream.consumer_principal, type = "Topic", name = stream.topic, operation = "Describe" }
      "${key}_consumer_topic_create"   = { principal = stream.consumer_principal, type = "Topic", name = stream.topic, operation = "Create" }
      "${key}_consumer_group_read"     = { principal = stream.consumer_principal, type = "Group", name = stream.consumer_group, operation = "Read" }
    }
  ]...)
}

################################################################################
# The ACL admin
################################################################################

resource "kafka_acl" "admin" {
  resource_name                = "kafka-cluster"
  resource_type                = "Cluster"
  resource_pattern_type_filter = "Literal"
  acl_principal                = var.admin_principal
  acl_host                     = "*"
  acl_operation                = "Alter"
  acl_permission_type          = "Allow"
}

################################################################################
# Relays and consumers
################################################################################

resource "kafka_acl" "workload" {
  for_each = local.workload_acls

  resource_name                = each.value.name
  resource_type                = each.value.type
  resource_pattern_type_filter = "Literal"
  acl_principal                = each.value.principal
  acl_host                     = "*"
  acl_operation                = each.value.operation
  acl_permission_type          = "Allow"

  # Created after, and destroyed before, the admin's own ACL: once the cluster
  # denies by default, the admin needs it to change any other.
  depends_on = [kafka_acl.admin]
}

################################################################################
# Addresses before the second direction
#
# The ACLs of Region 1's stream were keyed without the stream (relay_topic_write,
# ...); moving them keeps the existing ACLs instead of deleting and recreating
# them, which would lock the relay and the consumer out in between.
################################################################################

moved {
  from = kafka_acl.workload["relay_topic_write"]
  to   = kafka_acl.workload["region1_relay_topic_write"]
}

moved {
  from = kafka_acl.workload["relay_topic_describe"]
  to   = kafka_acl.workload["region1_relay_topic_describe"]
}

moved {
  from = kafka_acl.workload["relay_topic_create"]
  to   = kafka_acl.workload["region1_relay_topic_create"]
}

moved {
  from = kafka_acl.workload["consumer_topic_read"]
  to   = kafka_acl.workload["region1_consumer_topic_read"]
}

moved {
  from = kafka_acl.workload["consumer_topic_describe"]
  to   = kafka_acl.workload["region1_consumer_topic_describe"]
}

moved {
  from = kafka_acl.workload["consumer_topic_create"]
  to   = kafka_acl.workload["region1_consumer_topic_create"]
}

moved {
  from = kafka_acl.workload["consumer_group_read"]
  to   = kafka_acl.workload["region1_consumer_group_read"]
}
