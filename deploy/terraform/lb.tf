# An internet-facing Network Load Balancer: TLS with an ACM certificate for HTTPS and
# WebSocket (443) and Flight SQL (50051, HTTP/2 by ALPN), TCP passthrough for Postgres
# (5433), which negotiates TLS inside its own protocol and is terminated by Quiver.

resource "aws_acm_certificate" "quiver" {
  domain_name       = var.domain_name
  validation_method = "DNS"
  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_route53_record" "validation" {
  for_each = {
    for o in aws_acm_certificate.quiver.domain_validation_options : o.domain_name => o
  }
  zone_id = var.route53_zone_id
  name    = each.value.resource_record_name
  type    = each.value.resource_record_type
  records = [each.value.resource_record_value]
  ttl     = 300
}

resource "aws_acm_certificate_validation" "quiver" {
  certificate_arn         = aws_acm_certificate.quiver.arn
  validation_record_fqdns = [for r in aws_route53_record.validation : r.fqdn]
}

resource "aws_security_group" "lb" {
  name_prefix = "${var.name}-lb-"
  description = "Quiver load balancer: client ports from the allowed networks"
  vpc_id      = var.vpc_id
  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "lb" {
  for_each = {
    for pair in setproduct(["443", "5433", "50051"], var.allowed_cidrs) : "${pair[0]}-${pair[1]}" => pair
  }
  security_group_id = aws_security_group.lb.id
  ip_protocol       = "tcp"
  from_port         = tonumber(each.value[0])
  to_port           = tonumber(each.value[0])
  cidr_ipv4         = each.value[1]
  description       = "clients on ${each.value[0]}"
}

resource "aws_vpc_security_group_egress_rule" "lb_to_node" {
  for_each                     = local.ports
  security_group_id            = aws_security_group.lb.id
  referenced_security_group_id = aws_security_group.node.id
  ip_protocol                  = "tcp"
  from_port                    = each.value
  to_port                      = each.value
  description                  = "${each.key} to the node"
}

resource "aws_lb" "quiver" {
  # checkov:skip=CKV_AWS_91:NLB access logs only record TLS listeners' connections; Quiver's own JSON logs (CloudWatch) carry every request with its id.
  # checkov:skip=CKV2_AWS_20:No HTTP listener exists to redirect: every web listener is TLS.
  name_prefix                      = substr(var.name, 0, 6)
  load_balancer_type               = "network"
  internal                         = false
  subnets                          = var.public_subnet_ids
  security_groups                  = [aws_security_group.lb.id]
  enable_deletion_protection       = true
  enable_cross_zone_load_balancing = true
  drop_invalid_header_fields       = true
}

resource "aws_lb_target_group" "node" {
  for_each             = local.ports
  name_prefix          = substr("${each.key}-", 0, 6)
  port                 = each.value
  protocol             = "TCP"
  vpc_id               = var.vpc_id
  deregistration_delay = 30
  # Every target group checks the same thing: the node is ready (WAL replayed).
  health_check {
    protocol            = "HTTP"
    port                = tostring(local.ports.http)
    path                = "/ready"
    interval            = 10
    healthy_threshold   = 2
    unhealthy_threshold = 3
  }
  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_lb_listener" "https" {
  load_balancer_arn = aws_lb.quiver.arn
  port              = 443
  protocol          = "TLS"
  certificate_arn   = aws_acm_certificate_validation.quiver.certificate_arn
  ssl_policy        = "ELBSecurityPolicy-TLS13-1-2-2021-06"
  alpn_policy       = "HTTP1Only"
  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.node["http"].arn
  }
}

resource "aws_lb_listener" "flight" {
  load_balancer_arn = aws_lb.quiver.arn
  port              = 50051
  protocol          = "TLS"
  certificate_arn   = aws_acm_certificate_validation.quiver.certificate_arn
  ssl_policy        = "ELBSecurityPolicy-TLS13-1-2-2021-06"
  alpn_policy       = "HTTP2Only"
  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.node["flight"].arn
  }
}

resource "aws_lb_listener" "pg" {
  # checkov:skip=CKV_AWS_2:Postgres clients start with a plaintext SSLRequest, so this listener passes TCP through and Quiver terminates TLS with --pg-tls-cert.
  # checkov:skip=CKV_AWS_103:Same: TLS on this port is Quiver's own (TLS 1.2+ by rustls's safe defaults).
  load_balancer_arn = aws_lb.quiver.arn
  port              = 5433
  protocol          = "TCP"
  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.node["pg"].arn
  }
}

resource "aws_route53_record" "quiver" {
  zone_id = var.route53_zone_id
  name    = var.domain_name
  type    = "A"
  alias {
    name                   = aws_lb.quiver.dns_name
    zone_id                = aws_lb.quiver.zone_id
    evaluate_target_health = true
  }
}
