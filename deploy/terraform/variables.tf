variable "name" {
  description = "Prefix of every resource name (e.g. quiver-prod)."
  type        = string
  default     = "quiver"
  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{2,30}$", var.name))
    error_message = "Lower-case letters, digits and dashes, 3 to 31 characters."
  }
}

variable "region" {
  description = "AWS region."
  type        = string
  default     = "eu-west-1"
}

variable "tags" {
  description = "Extra tags on every resource."
  type        = map(string)
  default     = {}
}

variable "vpc_id" {
  description = "VPC to run in."
  type        = string
}

variable "public_subnet_ids" {
  description = "Subnets of the internet-facing load balancer (two or more AZs)."
  type        = list(string)
}

variable "node_subnet_id" {
  description = "Private subnet of the Quiver node. Its AZ is where the WAL volume lives, so the node is always replaced in the same AZ."
  type        = string
}

variable "allowed_cidrs" {
  description = "Client networks allowed to reach the load balancer (HTTPS/WSS, Postgres, Flight SQL)."
  type        = list(string)
}

variable "domain_name" {
  description = "DNS name clients use (e.g. quiver.example.com); the ACM certificate is issued for it."
  type        = string
}

variable "route53_zone_id" {
  description = "Hosted zone for domain_name: the certificate is validated and the alias record made there."
  type        = string
}

variable "image" {
  description = "Quiver container image (built from deploy/Dockerfile and pushed to ECR), e.g. 123456789012.dkr.ecr.eu-west-1.amazonaws.com/quiver:0.1.0."
  type        = string
}

variable "instance_type" {
  description = "EC2 instance type of the node (memory: --view-memory-limit plus --query-memory-limit times concurrent queries plus --max-buffer-bytes, with headroom)."
  type        = string
  default     = "m7g.xlarge"
}

variable "ami_ssm_parameter" {
  description = "SSM parameter holding the AMI (Amazon Linux 2023, matching the instance's architecture)."
  type        = string
  default     = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-arm64"
}

variable "wal_volume_gb" {
  description = "Size of the EBS volume holding the write-ahead log and view state (gp3)."
  type        = number
  default     = 100
}

variable "wal_volume_iops" {
  description = "Provisioned IOPS of the WAL volume (gp3: 3000 to 16000); fsync latency depends on it."
  type        = number
  default     = 6000
}

variable "pg_tls_secret_arn" {
  description = "Secrets Manager secret with the Postgres listener's certificate chain and key as JSON {\"cert\": PEM, \"key\": PEM}. Postgres clients negotiate TLS inside their protocol, so the load balancer passes port 5433 through and Quiver terminates TLS itself."
  type        = string
}

variable "admin_token_secret_arn" {
  description = "Secrets Manager secret whose string is Quiver's admin token (e.g. `openssl rand -hex 24`). Read into a file at boot, never put in the environment."
  type        = string
}

variable "store_prefix" {
  description = "Key prefix of the store inside the bucket."
  type        = string
  default     = "prod"
}

variable "noncurrent_version_days" {
  description = "Days an overwritten or deleted object version is kept (Delta files removed by vacuum, older catalog documents) before it expires."
  type        = number
  default     = 30
}

variable "report_file_days" {
  description = "Days report files live in the bucket (Quiver's --report-retention also deletes them)."
  type        = number
  default     = 90
}

variable "log_retention_days" {
  description = "Days CloudWatch keeps Quiver's logs."
  type        = number
  default     = 365
}

variable "alarm_emails" {
  description = "Addresses the alarm topic emails (each confirms its subscription)."
  type        = list(string)
  default     = []
}

variable "quiver_flags" {
  description = "Extra QUIVER_* settings for the server (e.g. { QUIVER_RATE_LIMIT = \"200\" })."
  type        = map(string)
  default     = {}
}
