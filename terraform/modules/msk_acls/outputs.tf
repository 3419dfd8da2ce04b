output "acl_ids" {
  description = "ID of every ACL (principal|host|operation|permission|resource type|name|pattern), keyed admin_cluster_alter and by the workload ACL names."
  value = merge(
    { admin_cluster_alter = kafka_acl.admin.id },
    { for key, acl in kafka_acl.workload : key => acl.id },
  )
}
