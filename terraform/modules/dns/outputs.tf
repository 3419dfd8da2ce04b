output "certificate_arns" {
  description = "Validated ACM certificate ARN per region (for the HTTPS listeners)."
  value = {
    region1 = aws_acm_certificate_validation.region1.certificate_arn
    region2 = aws_acm_certificate_validation.region2.certificate_arn
  }
}

output "health_check_ids" {
  description = "Route 53 health check ID per region (alarm on HealthCheckStatus)."
  value       = { for region, check in aws_route53_health_check.region : region => check.id }
}

output "leader_health_check_ids" {
  description = "Route 53 health check ID per region of GET /leader (the write record's); only the write region's is healthy."
  value       = { for region, check in aws_route53_health_check.leader : region => check.id }
}

output "global_endpoint" {
  description = "Global HTTPS endpoint (failover between the regions)."
  value       = "https://${var.global_hostname}"
}

output "write_endpoint" {
  description = "HTTPS endpoint of writes (follows the write region; either region accepts writes)."
  value       = "https://${var.write_hostname}"
}

output "region_endpoints" {
  description = "Per-region HTTPS endpoints."
  value       = { for region in local.regions : region => "https://${var.region_hostnames[region]}" }
}

output "zone_id" {
  description = "ID of the hosted zone."
  value       = data.aws_route53_zone.this.zone_id
}
