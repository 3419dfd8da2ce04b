################################################################################
# Endpoints
################################################################################

output "global_endpoint" {
  description = "Global HTTPS endpoint: Region 1 while its /readyz is healthy, Region 2 (read-only) otherwise."
  value       = module.dns.global_endpoint
}

output "write_endpoint" {
  description = "HTTPS endpoint of writes: the write region while its GET /leader answers 200 (either region accepts writes; a follower forwards them)."
  value       = module.dns.write_endpoint
}

output "region_endpoints" {
  description = "Per-region HTTPS endpoints (health-checked at /readyz)."
  value       = module.dns.region_endpoints
}

output "health_check_ids" {
  description = "Route 53 health check ID per region of /readyz (failover drill, HealthCheckStatus alarms)."
  value       = module.dns.health_check_ids
}

output "leader_health_check_ids" {
  description = "Route 53 health check ID per region of GET /leader (the write record): healthy in the write region only, so the follower's is unhealthy by design."
  value       = module.dns.leader_health_check_ids
}

output "load_balancer_dns_names" {
  description = "ALB DNS name per region (for debugging without Route 53)."
  value = {
    region1 = module.region1.load_balancer_dns_name
    region2 = module.region2.load_balancer_dns_name
  }
}

################################################################################
# Images
################################################################################

output "ecr_repository_urls" {
  description = "ECR repository URI per image in Region 1 (push here)."
  value       = module.ecr.repository_urls
}

output "ecr_replica_repository_urls" {
  description = "ECR repository URI per image in Region 2 (replicated; the Region 2 overlay pulls from here)."
  value       = module.ecr.replica_repository_urls
}

################################################################################
# Clusters
################################################################################

output "eks_cluster_names" {
  description = "EKS cluster name per region."
  value = {
    region1 = module.region1.eks_cluster_name
    region2 = module.region2.eks_cluster_name
  }
}

output "kubeconfig_commands" {
  description = "Commands that add both clusters to ~/.kube/config."
  value = {
    region1 = "aws eks update-kubeconfig --region ${var.region1} --name ${module.region1.eks_cluster_name} --alias tandem-region1"
    region2 = "aws eks update-kubeconfig --region ${var.region2} --name ${module.region2.eks_cluster_name} --alias tandem-region2"
  }
}

output "vpc_ids" {
  description = "VPC ID per region (Helm value vpcId of the AWS Load Balancer Controller)."
  value = {
    region1 = module.region1.vpc_id
    region2 = module.region2.vpc_id
  }
}

output "vpc_cidr_blocks" {
  description = "VPC CIDR per region (to narrow the 10.0.0.0/8 egress of the NetworkPolicies in eks/base)."
  value = {
    region1 = var.region1_network.cidr_block
    region2 = var.region2_network.cidr_block
  }
}

output "lb_controller_role_arns" {
  description = "IRSA role ARN of the AWS Load Balancer Controller per region (kube-system/aws-load-balancer-controller)."
  value = {
    region1 = module.region1.lb_controller_role_arn
    region2 = module.region2.lb_controller_role_arn
  }
}

################################################################################
# Values for the Kubernetes overlays (eks/overlays/region1, eks/overlays/region2)
################################################################################

output "workload_role_arns" {
  description = "IRSA role ARN per region and workload: the eks.amazonaws.com/role-arn annotations of the ServiceAccounts."
  value = {
    region1 = module.region1.workload_role_arns
    region2 = module.region2.workload_role_arns
  }
}

output "target_group_arns" {
  description = "IP target group ARN per region and workload: spec.targetGroupARN of the TargetGroupBinding objects."
  value = {
    region1 = module.region1.pod_target_group_arns
    region2 = module.region2.pod_target_group_arns
  }
}

output "load_balancer_subnet_cidrs" {
  description = "Public subnet CIDRs per region, where the ALB's addresses are: the only address ranges the API pods' NetworkPolicies admit (eks/overlays/regionN/patches/network-policies.yaml)."
  value = {
    region1 = var.region1_network.public_subnet_cidrs
    region2 = var.region2_network.public_subnet_cidrs
  }
}

output "overlay_values" {
  description = "Every environment value the overlays need, per region and ConfigMap (configMapGenerator literals of eks/overlays/regionN)."
  value = {
    for region in local.regions : region => {
      tandem-common = {
        TANDEM_REGION      = region
        AWS_REGION         = region == "region1" ? var.region1 : var.region2
        DATABASE_SECRET_ID = region == "region1" ? module.region1.database_secret_name : module.region2.database_secret_name
      }
      tandem-cache = {
        REDIS_URL            = region == "region1" ? module.region1.redis_url : module.region2.redis_url
        REDIS_AUTH_SECRET_ID = region == "region1" ? module.region1.redis_auth_secret_name : module.region2.redis_auth_secret_name
      }
      tandem-auth = {
        TANDEM_JWKS_URL     = local.jwks_url
        TANDEM_JWT_ISSUER   = var.jwt_issuer
        TANDEM_JWT_AUDIENCE = var.jwt_audience
      }
      tandem-kafka = {
        KAFKA_BROKERS = module.msk.bootstrap_brokers_sasl_scram
      }
      tandem-write-config = local.lambda_write_env[region]
      tandem-read-config  = local.lambda_read_env[region]
      # This region's relay publishes this region's topic...
      tandem-outbox-relay-config = {
        KAFKA_TOPIC          = var.kafka_topics[region]
        KAFKA_SASL_SECRET_ID = module.msk.scram_secret_names[local.kafka_users[region].relay]
      }
      # ... and its consumer reads the other region's, in its own group.
      tandem-region2-consumer-config = {
        KAFKA_TOPIC          = var.kafka_topics[local.other_region[region]]
        KAFKA_GROUP_ID       = var.consumer_groups[region]
        KAFKA_SASL_SECRET_ID = module.msk.scram_secret_names[local.kafka_users[region].consumer]
      }
    }
  }
}

################################################################################
# Input of terraform/deployments/tandem-kafka-acls (read through remote state)
################################################################################

output "kafka_acl_inputs" {
  description = "What the Kafka ACL deployment (terraform/deployments/tandem-kafka-acls) needs: the MSK cluster, its SASL/SCRAM bootstrap brokers, the streams (per direction: topic, relay and consumer principals, consumer group), the principal per SCRAM user and the admin's secret."
  value = {
    region            = var.region1
    cluster_name      = module.msk.cluster_name
    bootstrap_brokers = module.msk.bootstrap_brokers_sasl_scram
    kafka_version     = var.kafka_version
    streams           = local.kafka_streams
    principals        = module.msk.scram_principals
    admin_secret_arn  = module.msk.scram_secret_arns["admin"]
  }
}

output "database_master_secret_arns" {
  description = "RDS-managed master secret per region (bootstrap SQL only; never given to a workload)."
  value = {
    region1 = module.region1.database_master_secret_arn
    region2 = module.region2.database_master_secret_arn
  }
}

output "database_addresses" {
  description = "PostgreSQL host per region (bootstrap SQL)."
  value = {
    region1 = module.region1.database_address
    region2 = module.region2.database_address
  }
}

output "rds_proxy_endpoints" {
  description = "RDS Proxy endpoint per region (Lambda mode only; null otherwise)."
  value = {
    region1 = module.region1.rds_proxy_endpoint
    region2 = module.region2.rds_proxy_endpoint
  }
}

output "lambda_function_names" {
  description = "Lambda function names (Lambda mode only)."
  value = {
    region1_write = module.region1.write_function_name
    region1_read  = module.region1.read_function_name
    region2_write = module.region2.write_function_name
    region2_read  = module.region2.read_function_name
  }
}

################################################################################
# Region 2's apply
################################################################################

output "region2_apply" {
  description = "What applies Region 1's events to Region 2 (region2_apply_mode) and, in lambda mode, its function, event source mapping and the queue of batches the event source gave up on (alarm when it is not empty)."
  value = {
    mode                      = var.region2_apply_mode
    function_name             = module.region2.apply_function_name
    event_source_mapping_uuid = module.region2.apply_event_source_mapping_uuid
    discarded_queue_url       = module.region2.apply_discarded_queue_url
  }
}
