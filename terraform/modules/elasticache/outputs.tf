output "primary_endpoint" {
  description = "Primary endpoint host name (writes and read-through fills)."
  value       = aws_elasticache_replication_group.this.primary_endpoint_address
}

output "port" {
  description = "Redis port."
  value       = local.port
}

output "redis_url" {
  description = "REDIS_URL for the services (TLS; the AUTH token is read from REDIS_AUTH_SECRET_ID)."
  value       = "rediss://${aws_elasticache_replication_group.this.primary_endpoint_address}:${local.port}"
}

output "auth_secret_arn" {
  description = "ARN of the secret holding the AUTH token (REDIS_AUTH_SECRET_ID)."
  value       = aws_secretsmanager_secret.auth.arn
}

output "auth_secret_name" {
  description = "Name of the secret holding the AUTH token."
  value       = aws_secretsmanager_secret.auth.name
}

output "security_group_id" {
  description = "Security group of the cache."
  value       = aws_security_group.redis.id
}
