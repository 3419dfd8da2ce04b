output "function_arn" {
  description = "ARN of the Lambda function."
  value       = aws_lambda_function.this.arn
}

output "function_name" {
  description = "Name of the Lambda function."
  value       = aws_lambda_function.this.function_name
}

output "role_arn" {
  description = "ARN of the function's execution role."
  value       = aws_iam_role.function.arn
}

output "security_group_id" {
  description = "Security group of the function (allow it on the RDS Proxy and Redis)."
  value       = aws_security_group.function.id
}

output "target_group_arn" {
  description = "ARN of the Lambda target group to forward ALB listener rules to."
  value       = aws_lb_target_group.this.arn
}
