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
# Leader health checks
#
# Each region's GET /leader, over HTTPS on its own host name: the ALB routes
# that path to the Write API (modules/alb), which answers 200 only while its
# region is the write region and not fenced, 503 otherwise. So at most one is
# healthy; the follower's is unhealthy by design (alarm on "neither healthy",
# not on either one).
################################################################################

resource "aws_route53_health_check" "leader" {
  for_each = local.regions

  type              = "HTTPS"
  fqdn              = var.region_hostnames[each.key]
  port              = 443
  resource_path     = var.leader_health_check_path
  enable_sni        = true
  failure_threshold = var.leader_health_check_failure_threshold
  request_interval  = var.leader_health_check_interval_seconds

  tags = merge(var.tags, { Name = "tandem-${each.key}-leader" })
}

################################################################################
# Write record: failover that follows the write region
#
# PRIMARY Region 1, SECONDARY Region 2, each with its region's leader health
# check: Route 53 answers with Region 1 while it is the write region, with
# Region 2 while Region 1 is not and Region 2 is, and with Region 1 when
# neither is (mid-switchover, or both fenced).
#
# Routing here is an optimisation, not correctness: either region's Write API
# accepts every write (a follower forwards it to the write region's), so a
# stale answer (DNS caches, the TTL, the health checks' own delay) costs one
# inter-region round trip, never a wrong or lost write. And the health checks
# only steer traffic; nothing here promotes a region: the write region moves
# only when an operator runs `tandem switchover` (docs/deploy.md).
#
# evaluate_target_health is off: /leader goes through the same ALB to the same
# Write API targets, so the health check already says what the target health
# would, and the record should follow the write region, nothing else.
################################################################################

resource "aws_route53_record" "write" {
  for_each = local.regions

  zone_id         = data.aws_route53_zone.this.zone_id
  name            = var.write_hostname
  type            = "A"
  set_identifier  = each.key
  health_check_id = aws_route53_health_check.leader[each.key].id

  failover_routing_policy {
    type = each.key == "region1" ? "PRIMARY" : "SECONDARY"
  }

  alias {
    name                   = var.load_balancers[each.key].dns_name
    zone_id                = var.load_balancers[each.key].zone_id
    evaluate_target_health = false
  }
}

################################################################################
# Addresses before the failover write record
################################################################################

# The single primary-only record was Region 1's; the same record (name, set
# identifier) is now the PRIMARY of the pair.
moved {
  from = aws_route53_record.write
  to   = aws_route53_record.write["region1"]
}
