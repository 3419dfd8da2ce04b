################################################################################
# Network and cluster
################################################################################

output "kms_key_arn" {
  description = "KMS key of the region (data stores, secrets, log groups)."
  value       = module.kms.key_arn
}

output "vpc_id" {
  description = "VPC of the region."
  value       = module.network.vpc_id
}

output "private_subnet_ids" {
  description = "Private subnets of the region."
  value       = module.network.private_subnet_ids
}

output "private_route_table_ids" {
  description = "Route tables of the private subnets (routes to the peered VPC)."
  value       = module.network.private_route_table_ids
}

output "nat_public_ips" {
  description = "Public IPs of the NAT gateways: where this region's calls to the other region's load balancer come from."
  value       = module.network.nat_public_ips
}

output "eks_cluster_name" {
  description = "Name of the EKS cluster."
  value       = module.eks.cluster_name
}

output "lb_controller_role_arn" {
  description = "IRSA role ARN of the AWS Load Balancer Controller (kube-system/aws-load-balancer-controller)."
  value       = module.eks.lb_controller_role_arn
}

output "workload_role_arns" {
  description = "IRSA role ARN per workload (write, read, relay, consumer)."
  value       = module.iam.role_arns
}

################################################################################
# Data stores
################################################################################

output "database_address" {
  description = "PostgreSQL host."
  value       = module.rds.address
}

output "database_master_secret_arn" {
  description = "RDS-managed master secret (bootstrap SQL only; never given to a workload)."
  value       = module.rds.master_secret_arn
}

output "database_secret_name" {
  description = "Secret of the application's database credentials (DATABASE_SECRET_ID of the pods)."
  value       = module.rds.app_secret_name
}

output "rds_proxy_endpoint" {
  description = "RDS Proxy endpoint (Lambda functions only; null otherwise)."
  value       = module.rds.proxy_endpoint
}

output "redis_url" {
  description = "rediss:// URL of the Redis replication group (REDIS_URL)."
  value       = module.elasticache.redis_url
}

output "redis_auth_secret_name" {
  description = "Secret of the Redis AUTH token (REDIS_AUTH_SECRET_ID)."
  value       = module.elasticache.auth_secret_name
}

################################################################################
# Load balancer
################################################################################

output "load_balancer_dns_name" {
  description = "DNS name of the ALB."
  value       = module.alb.dns_name
}

output "load_balancer_zone_id" {
  description = "Route 53 zone ID of the ALB (alias records)."
  value       = module.alb.zone_id
}

output "pod_target_group_arns" {
  description = "IP target group ARN per workload (spec.targetGroupARN of the TargetGroupBinding objects)."
  value       = module.alb.pod_target_group_arns
}

################################################################################
# Lambda functions
################################################################################

output "write_function_name" {
  description = "Name of the Write function (Lambda mode; null otherwise)."
  value       = one(module.lambda_write[*].function_name)
}

output "read_function_name" {
  description = "Name of the Read function (Lambda mode; null otherwise)."
  value       = one(module.lambda_read[*].function_name)
}

output "apply_function_name" {
  description = "Name of the apply function (apply_lambda set; null otherwise)."
  value       = one(module.lambda_apply[*].function_name)
}

output "apply_event_source_mapping_uuid" {
  description = "UUID of the apply function's Kafka event source mapping (apply_lambda set; null otherwise)."
  value       = one(module.lambda_apply[*].event_source_mapping_uuid)
}

output "apply_discarded_queue_url" {
  description = "URL of the queue of batches the event source gave up on (apply_lambda set; null otherwise; alarm when it is not empty)."
  value       = one(module.lambda_apply[*].discarded_queue_url)
}
