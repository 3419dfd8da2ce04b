output "role_arns" {
  description = "IRSA role ARN per workload key; goes into the eks.amazonaws.com/role-arn annotation of the matching ServiceAccount."
  value       = { for key, role in aws_iam_role.workload : key => role.arn }
}

output "role_names" {
  description = "IRSA role name per workload key."
  value       = { for key, role in aws_iam_role.workload : key => role.name }
}
