################################################################################
# Hosted zone
################################################################################

data "aws_route53_zone" "this" {
  name         = var.zone_name
  private_zone = false
}

locals {
  regions = toset(["region1", "region2"])
  # Both certificates cover every Tandem name, so either region can answer any of them.
  subject_alternative_names = concat([var.write_hostname], [for region in ["region1", "region2"] : var.region_hostnames[region]])
}

################################################################################
# ACM certificates (one per region: an ALB uses a certificate from its own region)
################################################################################

resource "aws_acm_certificate" "region1" {
  provider = aws.region1

  domain_name               = var.global_hostname
  subject_alternative_names = local.subject_alternative_names
  validation_method         = "DNS"
  tags                      = var.tags

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_acm_certificate" "region2" {
  provider = aws.region2

  domain_name               = var.global_hostname
  subject_alternative_names = local.subject_alternative_names
  validation_method         = "DNS"
  tags                      = var.tags

  lifecycle {
    create_before_destroy = true
  }
}

locals {
  # ACM usually asks for the same CNAME for a name in every region of an
  # account; allow_overwrite makes the second write an idempotent UPSERT.
  validation_records = merge(
    { for dvo in aws_acm_certificate.region1.domain_validation_options : "region1/${dvo.domain_name}" => dvo },
    { for dvo in aws_acm_certificate.region2.domain_validation_options : "region2/${dvo.domain_name}" => dvo },
  )
}

resource "aws_route53_record" "validation" {
  for_each = local.validation_records

  zone_id         = data.aws_route53_zone.this.zone_id
  name            = each.value.resource_record_name
  type            = each.value.resource_record_type
  records         = [each.value.resource_record_value]
  ttl             = var.record_ttl_seconds
  allow_overwrite = true
}

resource "aws_acm_certificate_validation" "region1" {
  provider = aws.region1

  certificate_arn         = aws_acm_certificate.region1.arn
  validation_record_fqdns = [for key, record in aws_route53_record.validation : record.fqdn if startswith(key, "region1/")]
}

resource "aws_acm_certificate_validation" "region2" {
  provider = aws.region2

  certificate_arn         = aws_acm_certificate.region2.arn
  validation_record_fqdns = [for key, record in aws_route53_record.validation : record.fqdn if startswith(key, "region2/")]
}

################################################################################
# Per-region records
################################################################################

resource "aws_route53_record" "region" {
  for_each = local.regions

  zone_id = data.aws_route53_zone.this.zone_id
  name    = var.region_hostnames[each.key]
  type    = "A"

  alias {
    name                   = var.load_balancers[each.key].dns_name
    zone_id                = var.load_balancers[each.key].zone_id
    evaluate_target_health = true
  }
}

################################################################################
# Health checks
#
# Each region is probed over HTTPS on its own host name at /readyz. The ALB
# forwards GET to the Read API, whose readiness covers PostgreSQL and Redis, so
# a region whose database is unreachable is taken out of the global record.
################################################################################

resource "aws_route53_health_check" "region" {
  for_each = local.regions

  type              = "HTTPS"
  fqdn              = var.region_hostnames[each.key]
  port              = 443
  resource_path     = var.health_check_path
  enable_sni        = true
  failure_threshold = var.health_check_failure_threshold
  request_interval  = var.health_check_interval_seconds
  measure_latency   = true

  tags = merge(var.tags, { Name = "tandem-${each.key}-readyz" })
}

################################################################################
# Global record: failover, Region 1 primary, Region 2 secondary
#
# Only the primary carries its health check. A secondary without one is the
# last resort Route 53 always falls back to; with one, a Region 1 outage that
# also makes Region 2 report itself unready (its replication-lag readiness
# check grows while Kafka in Region 1 is unreachable) would leave both records
# unhealthy, and Route 53 would keep answering with Region 1. The Region 2
# health check still exists, for alarms and dashboards.
################################################################################

resource "aws_route53_record" "global" {
  for_each = local.regions

  zone_id         = data.aws_route53_zone.this.zone_id
  name            = var.global_hostname
  type            = "A"
  set_identifier  = each.key
  health_check_id = each.key == "region1" ? aws_route53_health_check.region["region1"].id : null

  failover_routing_policy {
    type = each.key == "region1" ? "PRIMARY" : "SECONDARY"
  }

  alias {
    name    = var.load_balancers[each.key].dns_name
    zone_id = var.load_balancers[each.key].zone_id
    # For the same reason, the secondary does not inherit its ALB's target health.
    evaluate_target_health = each.key == "region1"
  }
}

################################################################################
# Write record: primary only
#
# There is no secondary: Region 2 cannot accept writes. With only a primary,
# Route 53 keeps answering with Region 1 even while it is unhealthy, so clients
# get Region 1's own error rather than NXDOMAIN.
################################################################################

resource "aws_route53_record" "write" {
  zone_id         = data.aws_route53_zone.this.zone_id
  name            = var.write_hostname
  type            = "A"
  set_identifier  = "region1"
  health_check_id = aws_route53_health_check.region["region1"].id

  failover_routing_policy {
    type = "PRIMARY"
  }

  alias {
    name                   = var.load_balancers["region1"].dns_name
    zone_id                = var.load_balancers["region1"].zone_id
    evaluate_target_health = true
  }
}
