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

output "event_source_security_group_id" {
  description = "Security group of the event source's pollers (allow it on the brokers' port)."
  value       = aws_security_group.event_source.id
}

output "event_source_mapping_uuid" {
  description = "UUID of the Kafka event source mapping (aws lambda get-event-source-mapping --uuid)."
  value       = aws_lambda_event_source_mapping.kafka.uuid
}

output "discarded_queue_url" {
  description = "URL of the SQS queue describing batches the event source gave up on (should stay empty)."
  value       = aws_sqs_queue.discarded.url
}

output "discarded_queue_arn" {
  description = "ARN of that queue (for an ApproximateNumberOfMessagesVisible alarm)."
  value       = aws_sqs_queue.discarded.arn
}
