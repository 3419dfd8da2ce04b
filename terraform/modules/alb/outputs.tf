output "arn" {
  description = "ARN of the load balancer."
  value       = aws_lb.this.arn
}

output "dns_name" {
  description = "DNS name of the load balancer (Route 53 alias target)."
  value       = aws_lb.this.dns_name
}

output "zone_id" {
  description = "Canonical hosted zone of the load balancer (Route 53 alias target)."
  value       = aws_lb.this.zone_id
}

output "security_group_id" {
  description = "Security group of the load balancer."
  value       = aws_security_group.alb.id
}

output "pod_target_group_arns" {
  description = "IP target group ARN per workload (write, read) for the TargetGroupBinding objects of the EKS overlays."
  value       = { for key, tg in aws_lb_target_group.pods : key => tg.arn }
}

output "https_listener_arn" {
  description = "ARN of the HTTPS listener."
  value       = aws_lb_listener.https.arn
}

output "web_acl_arn" {
  description = "ARN of the WAF web ACL attached to the load balancer."
  value       = aws_wafv2_web_acl.this.arn
}
