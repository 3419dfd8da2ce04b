output "cluster_arn" {
  description = "ARN of the MSK cluster."
  value       = aws_msk_cluster.this.arn
}

output "bootstrap_brokers_sasl_scram" {
  description = "Comma-separated SASL/SCRAM TLS bootstrap brokers (KAFKA_BROKERS)."
  value       = aws_msk_cluster.this.bootstrap_brokers_sasl_scram
}

output "scram_secret_arns" {
  description = "ARN of the AmazonMSK_ secret per SCRAM user (KAFKA_SASL_SECRET_ID)."
  value       = { for user, secret in aws_secretsmanager_secret.scram : user => secret.arn }
}

output "scram_secret_names" {
  description = "Name of the AmazonMSK_ secret per SCRAM user."
  value       = { for user, secret in aws_secretsmanager_secret.scram : user => secret.name }
}

output "scram_principals" {
  description = "Kafka principal (User:<SCRAM user name>) per SCRAM user: what the ACLs of modules/msk_acls name."
  value       = { for user, name in local.scram_usernames : user => "User:${name}" }
}

output "cluster_name" {
  description = "Name of the MSK cluster."
  value       = aws_msk_cluster.this.cluster_name
}

output "replica_secret_arns" {
  description = "ARN pattern of the replicated secret per replicated SCRAM user in replica_region (replicas keep the name and the random suffix, so a ?????? wildcard matches exactly one secret)."
  value = var.replica_region == null ? {} : {
    for user in var.replicated_users : user => "arn:${data.aws_partition.current.partition}:secretsmanager:${var.replica_region}:${data.aws_caller_identity.current.account_id}:secret:${aws_secretsmanager_secret.scram[user].name}-??????"
  }
}

output "security_group_id" {
  description = "Security group of the brokers."
  value       = aws_security_group.brokers.id
}
