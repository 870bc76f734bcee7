output "url" {
  description = "The dashboard and HTTP API (WebSocket at wss://…/v1/ws)."
  value       = "https://${var.domain_name}"
}

output "postgres" {
  description = "Connection string for psql and BI tools (the password is a Quiver token)."
  value       = "host=${var.domain_name} port=5433 dbname=quiver sslmode=verify-full"
}

output "flight_sql" {
  description = "Flight SQL endpoint for ADBC and JDBC clients."
  value       = "grpc+tls://${var.domain_name}:50051"
}

output "store" {
  description = "The store URL Quiver writes to; `quiver backup` and `quiver verify` take it too."
  value       = "s3://${aws_s3_bucket.store.bucket}/${var.store_prefix}"
}

output "bucket" {
  description = "The store's bucket."
  value       = aws_s3_bucket.store.bucket
}

output "wal_volume_id" {
  description = "The EBS volume of the write-ahead log (snapshot it with AWS Backup or DLM if you want a second copy)."
  value       = aws_ebs_volume.wal.id
}

output "log_group" {
  description = "CloudWatch log group of Quiver's JSON logs and scraped metrics."
  value       = aws_cloudwatch_log_group.quiver.name
}

output "alarm_topic_arn" {
  description = "SNS topic every alarm notifies."
  value       = aws_sns_topic.alarms.arn
}

output "node_role_arn" {
  description = "IAM role of the node."
  value       = aws_iam_role.node.arn
}
