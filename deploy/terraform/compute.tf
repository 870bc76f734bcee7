# One Quiver node in an Auto Scaling group of one: a failed instance is replaced in
# the same AZ, and the replacement attaches the same EBS volume, so the write-ahead log
# (acknowledged events not yet in the store) survives.

locals {
  metric_namespace = "Quiver/${var.name}"
  ports = {
    http   = 8080
    pg     = 5433
    flight = 50051
  }
}

data "aws_ssm_parameter" "ami" {
  name = var.ami_ssm_parameter
}

resource "aws_ebs_volume" "wal" {
  availability_zone = data.aws_subnet.node.availability_zone
  size              = var.wal_volume_gb
  type              = "gp3"
  iops              = var.wal_volume_iops
  throughput        = 250
  encrypted         = true
  kms_key_id        = aws_kms_key.quiver.arn
  tags = {
    Name       = "${var.name}-wal"
    QuiverNode = var.name
  }
}

resource "aws_security_group" "node" {
  name_prefix = "${var.name}-node-"
  description = "Quiver node: its listeners, from the load balancer only"
  vpc_id      = var.vpc_id
  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "node_from_lb" {
  for_each                     = local.ports
  security_group_id            = aws_security_group.node.id
  referenced_security_group_id = aws_security_group.lb.id
  ip_protocol                  = "tcp"
  from_port                    = each.value
  to_port                      = each.value
  description                  = "${each.key} from the load balancer"
}

resource "aws_vpc_security_group_egress_rule" "node_https" {
  security_group_id = aws_security_group.node.id
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = "0.0.0.0/0"
  description       = "S3, CloudWatch, SSM, ECR and Secrets Manager over HTTPS (use VPC endpoints to keep it inside the VPC)"
}

resource "aws_vpc_security_group_egress_rule" "node_smtp" {
  security_group_id = aws_security_group.node.id
  ip_protocol       = "tcp"
  from_port         = 587
  to_port           = 587
  cidr_ipv4         = "0.0.0.0/0"
  description       = "Alert and report emails through an SMTP relay (STARTTLS)"
}

resource "aws_launch_template" "node" {
  name_prefix            = "${var.name}-node-"
  image_id               = data.aws_ssm_parameter.ami.value
  instance_type          = var.instance_type
  update_default_version = true
  vpc_security_group_ids = [aws_security_group.node.id]
  ebs_optimized          = true

  iam_instance_profile {
    arn = aws_iam_instance_profile.node.arn
  }

  # IMDSv2 only, one hop: containers cannot reach the instance's credentials.
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }

  monitoring {
    enabled = true
  }

  block_device_mappings {
    device_name = "/dev/xvda"
    ebs {
      volume_size           = 30
      volume_type           = "gp3"
      encrypted             = true
      kms_key_id            = aws_kms_key.quiver.arn
      delete_on_termination = true
    }
  }

  user_data = base64encode(templatefile("${path.module}/user-data.sh.tftpl", {
    region         = var.region
    volume_id      = aws_ebs_volume.wal.id
    image          = var.image
    store          = "s3://${aws_s3_bucket.store.bucket}/${var.store_prefix}"
    log_group      = aws_cloudwatch_log_group.quiver.name
    namespace      = local.metric_namespace
    pg_tls_secret  = var.pg_tls_secret_arn
    admin_secret   = var.admin_token_secret_arn
    public_url     = "https://${var.domain_name}"
    extra_env      = var.quiver_flags
  }))

  tag_specifications {
    resource_type = "instance"
    tags = {
      Name       = "${var.name}-node"
      QuiverNode = var.name
    }
  }
}

resource "aws_autoscaling_group" "node" {
  name_prefix               = "${var.name}-node-"
  min_size                  = 1
  max_size                  = 1
  desired_capacity          = 1
  vpc_zone_identifier       = [var.node_subnet_id]
  health_check_type         = "ELB"
  health_check_grace_period = 300
  target_group_arns         = [for tg in aws_lb_target_group.node : tg.arn]
  # The old node must release the WAL volume before the new one can attach it.
  termination_policies = ["OldestInstance"]

  launch_template {
    id      = aws_launch_template.node.id
    version = aws_launch_template.node.latest_version
  }

  instance_refresh {
    strategy = "Rolling"
    preferences {
      min_healthy_percentage = 0
    }
  }

  tag {
    key                 = "QuiverNode"
    value               = var.name
    propagate_at_launch = true
  }
}
