################################################################################
# Kafka ACLs of the Tandem topic
#
# With allow.everyone.if.no.acl.found=false (modules/msk) a principal may do
# only what an ACL below allows. Every ACL is literal (one named resource),
# allows from any host (the security group limits the hosts) and is an Allow:
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
  workload_acls = {
    relay_topic_write       = { principal = var.relay_principal, type = "Topic", name = var.topic, operation = "Write" }
    relay_topic_describe    = { principal = var.relay_principal, type = "Topic", name = var.topic, operation = "Describe" }
    relay_topic_create      = { principal = var.relay_principal, type = "Topic", name = var.topic, operation = "Create" }
    consumer_topic_read     = { principal = var.consumer_principal, type = "Topic", name = var.topic, operation = "Read" }
    consumer_topic_describe = { principal = var.consumer_principal, type = "Topic", name = var.topic, operation = "Describe" }
    consumer_topic_create   = { principal = var.consumer_principal, type = "Topic", name = var.topic, operation = "Create" }
    consumer_group_read     = { principal = var.consumer_principal, type = "Group", name = var.consumer_group, operation = "Read" }
  }
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
# Relay and consumer
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
