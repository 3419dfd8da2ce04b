################################################################################
# Lookups
################################################################################

data "aws_caller_identity" "current" {}

data "aws_elb_service_account" "this" {}

locals {
  write_methods = ["POST", "PUT", "PATCH", "DELETE"]
  read_methods  = ["GET", "HEAD"]

  # Paths the services serve on their port for operators only (Prometheus
  # text): never forwarded from the internet. ALB path patterns are
  # case-sensitive, like the services' routes.
  internal_paths = ["/metrics", "/metrics/*"]

  # Operator paths of the Write API that are reads (GET) but must reach it.
  write_paths = ["/leader"]

  # Every region serves writes: the write region applies them, a follower
  # forwards them to the write region's Write API.
  write_target_group_arn = var.backend == "eks" ? aws_lb_target_group.pods["write"].arn : lookup(var.lambda_target_group_arns, "write", null)
  read_target_group_arn  = var.backend == "eks" ? aws_lb_target_group.pods["read"].arn : lookup(var.lambda_target_group_arns, "read", null)
}

################################################################################
# Security groups
################################################################################

resource "aws_security_group" "alb" {
  name        = "${var.name}-alb"
  description = "Internet-facing ALB ${var.name}: HTTPS (and HTTP for the redirect) in, service port to the VPC out"
  vpc_id      = var.vpc_id
  tags        = merge(var.tags, { Name = "${var.name}-alb" })
}

resource "aws_vpc_security_group_ingress_rule" "https" {
  security_group_id = aws_security_group.alb.id
  description       = "HTTPS from clients"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = "0.0.0.0/0"
}

resource "aws_vpc_security_group_ingress_rule" "http" {
  # checkov:skip=CKV_AWS_260:Port 80 only answers a 301 redirect to HTTPS; closing it would break clients that type the bare host name.
  security_group_id = aws_security_group.alb.id
  description       = "HTTP from clients, redirected to HTTPS"
  ip_protocol       = "tcp"
  from_port         = 80
  to_port           = 80
  cidr_ipv4         = "0.0.0.0/0"
}

resource "aws_vpc_security_group_egress_rule" "to_pods" {
  security_group_id = aws_security_group.alb.id
  description       = "To the Write and Read pods"
  ip_protocol       = "tcp"
  from_port         = var.service_port
  to_port           = var.service_port
  cidr_ipv4         = var.vpc_cidr_block
}

resource "aws_vpc_security_group_ingress_rule" "pods_from_alb" {
  security_group_id            = var.pod_security_group_id
  description                  = "Service port from the ALB ${var.name}"
  ip_protocol                  = "tcp"
  from_port                    = var.service_port
  to_port                      = var.service_port
  referenced_security_group_id = aws_security_group.alb.id
}

################################################################################
# Access logs bucket
################################################################################

resource "aws_s3_bucket" "access_logs" {
  # checkov:skip=CKV_AWS_18:This bucket is the access-log sink; logging it into itself or another bucket adds no audit value.
  # checkov:skip=CKV_AWS_144:Access logs are regional diagnostics; a cross-region copy doubles storage for data nobody restores.
  # checkov:skip=CKV_AWS_145:ALB access log delivery supports only SSE-S3 (AES256), not SSE-KMS.
  # checkov:skip=CKV2_AWS_62:Nothing consumes new-object events for access logs; they are read with Athena on demand.
  bucket_prefix = "${var.name}-alb-logs-"
  force_destroy = false
  tags          = var.tags
}

resource "aws_s3_bucket_public_access_block" "access_logs" {
  bucket                  = aws_s3_bucket.access_logs.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_ownership_controls" "access_logs" {
  bucket = aws_s3_bucket.access_logs.id

  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_versioning" "access_logs" {
  bucket = aws_s3_bucket.access_logs.id

  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "access_logs" {
  bucket = aws_s3_bucket.access_logs.id

  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "AES256"
    }
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "access_logs" {
  bucket = aws_s3_bucket.access_logs.id

  rule {
    id     = "expire"
    status = "Enabled"

    filter {}

    expiration {
      days = var.log_retention_days
    }

    noncurrent_version_expiration {
      noncurrent_days = 7
    }

    abort_incomplete_multipart_upload {
      days_after_initiation = 1
    }
  }
}

data "aws_iam_policy_document" "access_logs" {
  statement {
    sid       = "ElbLogDeliveryAccount"
    actions   = ["s3:PutObject"]
    resources = ["${aws_s3_bucket.access_logs.arn}/AWSLogs/${data.aws_caller_identity.current.account_id}/*"]

    principals {
      type        = "AWS"
      identifiers = [data.aws_elb_service_account.this.arn]
    }
  }

  # Regions opened after August 2022 deliver through this service principal
  # instead of a regional ELB account.
  statement {
    sid       = "ElbLogDeliveryService"
    actions   = ["s3:PutObject"]
    resources = ["${aws_s3_bucket.access_logs.arn}/AWSLogs/${data.aws_caller_identity.current.account_id}/*"]

    principals {
      type        = "Service"
      identifiers = ["logdelivery.elasticloadbalancing.amazonaws.com"]
    }
  }

  statement {
    sid     = "DenyPlainHttp"
    effect  = "Deny"
    actions = ["s3:*"]
    resources = [
      aws_s3_bucket.access_logs.arn,
      "${aws_s3_bucket.access_logs.arn}/*",
    ]

    principals {
      type        = "*"
      identifiers = ["*"]
    }

    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_s3_bucket_policy" "access_logs" {
  bucket = aws_s3_bucket.access_logs.id
  policy = data.aws_iam_policy_document.access_logs.json

  depends_on = [aws_s3_bucket_public_access_block.access_logs]
}

################################################################################
# Load balancer
################################################################################

resource "aws_lb" "this" {
  name                       = var.name
  internal                   = false
  load_balancer_type         = "application"
  security_groups            = [aws_security_group.alb.id]
  subnets                    = var.public_subnet_ids
  drop_invalid_header_fields = true
  enable_deletion_protection = var.deletion_protection
  idle_timeout               = 60

  access_logs {
    bucket  = aws_s3_bucket.access_logs.id
    enabled = true
  }

  tags = var.tags

  depends_on = [aws_s3_bucket_policy.access_logs]
}

################################################################################
# Target groups (EKS pods)
#
# Pod IPs are registered by the AWS Load Balancer Controller from the
# TargetGroupBinding objects in eks/overlays/*. TLS ends at the load balancer;
# the hop to the pod stays inside the VPC.
################################################################################

resource "aws_lb_target_group" "pods" {
  # checkov:skip=CKV_AWS_378:TLS terminates at the ALB; traffic from the ALB to the pods is plain, unencrypted HTTP inside the VPC (the pods serve no TLS), limited to the service port by the ALB and pod security groups and by the pods' NetworkPolicy.
  for_each = toset(["write", "read"])

  name                 = "${var.name}-${each.key}"
  target_type          = "ip"
  protocol             = "HTTP"
  port                 = var.service_port
  vpc_id               = var.vpc_id
  deregistration_delay = 30

  health_check {
    enabled             = true
    path                = "/readyz"
    protocol            = "HTTP"
    port                = "traffic-port"
    matcher             = "200"
    interval            = 10
    timeout             = 5
    healthy_threshold   = 2
    unhealthy_threshold = 2
  }

  tags = merge(var.tags, { "tandem/workload" = each.key })
}

################################################################################
# Listeners
################################################################################

resource "aws_lb_listener" "http" {
  load_balancer_arn = aws_lb.this.arn
  port              = 80
  protocol          = "HTTP"

  default_action {
    type = "redirect"

    redirect {
      port        = "443"
      protocol    = "HTTPS"
      status_code = "HTTP_301"
    }
  }

  tags = var.tags
}

resource "aws_lb_listener" "https" {
  load_balancer_arn = aws_lb.this.arn
  port              = 443
  protocol          = "HTTPS"
  ssl_policy        = "ELBSecurityPolicy-TLS13-1-2-2021-06"
  certificate_arn   = var.certificate_arn

  # Every other method goes to the Read API, which answers with the contract's
  # 405 /problems/method-not-allowed and an Allow header.
  default_action {
    type             = "forward"
    target_group_arn = local.read_target_group_arn
  }

  tags = var.tags
}

################################################################################
# Listener rules: internal paths first, then route by HTTP method
################################################################################

# /metrics is served on the same port as the API (scraped in the cluster at
# the pod IP); through the load balancer it answers what the services answer
# for a path no route matches. Priority 1, so no later rule can forward it.
resource "aws_lb_listener_rule" "internal_paths" {
  listener_arn = aws_lb_listener.https.arn
  priority     = 1

  condition {
    path_pattern {
      values = local.internal_paths
    }
  }

  action {
    type = "fixed-response"

    fixed_response {
      status_code  = "404"
      content_type = "application/json"
      message_body = jsonencode({
        type   = "/problems/no-route"
        title  = "Not found"
        status = 404
        detail = "the route does not exist"
      })
    }
  }

  tags = var.tags
}

# GET /leader is the Write API's answer to "is this region the write region
# right now" (200 if so and not fenced, 503 otherwise): the Route 53 health
# checks of the write record probe it through this load balancer, so it must
# reach the Write API, not the Read API the method rule below would pick.
resource "aws_lb_listener_rule" "leader" {
  listener_arn = aws_lb_listener.https.arn
  priority     = 5

  condition {
    path_pattern {
      values = local.write_paths
    }
  }

  action {
    type             = "forward"
    target_group_arn = local.write_target_group_arn
  }

  tags = var.tags
}

# Both regions: the write region applies writes, a follower's Write API
# forwards them to it.
resource "aws_lb_listener_rule" "write" {
  listener_arn = aws_lb_listener.https.arn
  priority     = 10

  condition {
    http_request_method {
      values = local.write_methods
    }
  }

  action {
    type             = "forward"
    target_group_arn = local.write_target_group_arn
  }

  tags = var.tags
}

resource "aws_lb_listener_rule" "read" {
  listener_arn = aws_lb_listener.https.arn
  priority     = 20

  condition {
    http_request_method {
      values = local.read_methods
    }
  }

  action {
    type             = "forward"
    target_group_arn = local.read_target_group_arn
  }

  tags = var.tags
}

################################################################################
# WAF
################################################################################

# The other region's NAT gateway addresses (may be empty).
resource "aws_wafv2_ip_set" "peer_region" {
  name               = "${var.name}-peer-region"
  description        = "Egress addresses of the other Tandem region (its forwarded writes)"
  scope              = "REGIONAL"
  ip_address_version = "IPV4"
  addresses          = [for ip in var.rate_limit_exempt_ips : "${ip}/32"]
  tags               = var.tags
}

resource "aws_wafv2_web_acl" "this" {
  name        = var.name
  description = "Tandem ${var.name}: AWS managed rules and a per-IP rate limit"
  scope       = "REGIONAL"

  default_action {
    allow {}
  }

  rule {
    name     = "common"
    priority = 10

    override_action {
      none {}
    }

    statement {
      managed_rule_group_statement {
        vendor_name = "AWS"
        name        = "AWSManagedRulesCommonRuleSet"

        # Documents can exceed the rule group's 8 KB body limit; the services
        # enforce their own body limit and answer 413.
        rule_action_override {
          name = "SizeRestrictions_BODY"

          action_to_use {
            count {}
          }
        }
      }
    }

    visibility_config {
      cloudwatch_metrics_enabled = true
      metric_name                = "${var.name}-common"
      sampled_requests_enabled   = true
    }
  }

  # Anonymising proxies and Tor are blocked; hosting-provider addresses are only
  # counted, because server-to-server clients legitimately run in clouds.
  rule {
    name     = "anonymous-ip"
    priority = 15

    override_action {
      none {}
    }

    statement {
      managed_rule_group_statement {
        vendor_name = "AWS"
        name        = "AWSManagedRulesAnonymousIpList"

        rule_action_override {
          name = "HostingProviderIPList"

          action_to_use {
            count {}
          }
        }
      }
    }

    visibility_config {
      cloudwatch_metrics_enabled = true
      metric_name                = "${var.name}-anonymous-ip"
      sampled_requests_enabled   = true
    }
  }

  rule {
    name     = "known-bad-inputs"
    priority = 20

    override_action {
      none {}
    }

    statement {
      managed_rule_group_statement {
        vendor_name = "AWS"
        name        = "AWSManagedRulesKnownBadInputsRuleSet"
      }
    }

    visibility_config {
      cloudwatch_metrics_enabled = true
      metric_name                = "${var.name}-known-bad-inputs"
      sampled_requests_enabled   = true
    }
  }

  rule {
    name     = "rate-limit"
    priority = 30

    action {
      block {}
    }

    statement {
      rate_based_statement {
        limit              = var.rate_limit_per_5_minutes
        aggregate_key_type = "IP"

        # Not the other region's egress: its Write API forwards every write of
        # its clients from a few NAT addresses; those clients were rate-limited
        # where they came in.
        scope_down_statement {
          not_statement {
            statement {
              ip_set_reference_statement {
                arn = aws_wafv2_ip_set.peer_region.arn
              }
            }
          }
        }
      }
    }

    visibility_config {
      cloudwatch_metrics_enabled = true
      metric_name                = "${var.name}-rate-limit"
      sampled_requests_enabled   = true
    }
  }

  visibility_config {
    cloudwatch_metrics_enabled = true
    metric_name                = var.name
    sampled_requests_enabled   = true
  }

  tags = var.tags
}

resource "aws_wafv2_web_acl_association" "this" {
  resource_arn = aws_lb.this.arn
  web_acl_arn  = aws_wafv2_web_acl.this.arn
}

# WAF only logs to log groups whose name starts with aws-waf-logs-.
resource "aws_cloudwatch_log_group" "waf" {
  name              = "aws-waf-logs-${var.name}"
  retention_in_days = var.log_retention_days
  kms_key_id        = var.kms_key_arn
  tags              = var.tags
}

resource "aws_wafv2_web_acl_logging_configuration" "this" {
  resource_arn            = aws_wafv2_web_acl.this.arn
  log_destination_configs = [aws_cloudwatch_log_group.waf.arn]

  redacted_fields {
    single_header {
      name = "authorization"
    }
  }
}
