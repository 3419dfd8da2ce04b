output "address" {
  description = "Host name of the PostgreSQL instance."
  value       = aws_db_instance.this.address
}

output "port" {
  description = "PostgreSQL port."
  value       = aws_db_instance.this.port
}

output "database_name" {
  description = "Name of the application database."
  value       = var.database_name
}

output "app_username" {
  description = "Application database role (DATABASE_IAM_USER for the Lambda functions)."
  value       = var.app_username
}

output "security_group_id" {
  description = "Security group of the instance."
  value       = aws_security_group.db.id
}

output "master_secret_arn" {
  description = "ARN of the RDS-managed master user secret (operators and the bootstrap SQL only)."
  value       = aws_db_instance.this.master_user_secret[0].secret_arn
}

output "app_secret_arn" {
  description = "ARN of the application secret in RDS JSON shape (DATABASE_SECRET_ID for the EKS workloads)."
  value       = aws_secretsmanager_secret.app.arn
}

output "app_secret_name" {
  description = "Name of the application secret."
  value       = aws_secretsmanager_secret.app.name
}

output "instance_db_user_arn" {
  description = "rds-db:connect resource for the application user directly on the instance (IAM auth without the proxy)."
  value       = "arn:${local.partition}:rds-db:${local.region}:${local.account}:dbuser:${aws_db_instance.this.resource_id}/${var.app_username}"
}

output "proxy_endpoint" {
  description = "Endpoint of the RDS Proxy (DATABASE_IAM_HOST for the Lambda functions); null without a proxy."
  value       = var.create_proxy ? aws_db_proxy.this[0].endpoint : null
}

output "proxy_db_user_arn" {
  description = "rds-db:connect resource for the application user through the proxy; null without a proxy."
  value       = var.create_proxy ? "arn:${local.partition}:rds-db:${local.region}:${local.account}:dbuser:${local.proxy_resource_id}/${var.app_username}" : null
}

output "proxy_security_group_id" {
  description = "Security group of the RDS Proxy; null without a proxy."
  value       = var.create_proxy ? aws_security_group.proxy[0].id : null
}
