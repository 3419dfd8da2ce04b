output "repository_urls" {
  description = "Repository URI per image name in the primary region."
  value       = { for name, repo in aws_ecr_repository.this : name => repo.repository_url }
}

output "replica_repository_urls" {
  description = "Repository URI per image name in the replica region (same name, replica registry)."
  value       = { for name in var.repository_names : name => "${data.aws_caller_identity.current.account_id}.dkr.ecr.${data.aws_region.replica.name}.amazonaws.com/${name}" }
}

output "repository_arns" {
  description = "Repository ARN per image name in the primary region (for the release role's push permissions)."
  value       = { for name, repo in aws_ecr_repository.this : name => repo.arn }
}
