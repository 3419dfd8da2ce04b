output "acl_ids" {
  description = "Every ACL this deployment manages on the MSK cluster."
  value       = module.acls.acl_ids
}

output "cluster_name" {
  description = "The MSK cluster the ACLs were applied to."
  value       = local.inputs.cluster_name
}
