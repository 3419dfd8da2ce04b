variable "zone_name" {
  type        = string
  description = "Existing public Route 53 hosted zone that holds the Tandem records, e.g. tandem.example.com."
}

variable "global_hostname" {
  type        = string
  description = "Global API host name (reads and writes; fails over from Region 1 to Region 2 on Region 1's /readyz), e.g. api.tandem.example.com."
}

variable "write_hostname" {
  type        = string
  description = "Write host name, a failover record on the regions' GET /leader: Region 1 while it is the write region, Region 2 while it is, e.g. write.tandem.example.com."
}

variable "region_hostnames" {
  type        = map(string)
  description = "Per-region host names keyed region1 and region2, e.g. { region1 = \"region1.tandem.example.com\", region2 = \"region2.tandem.example.com\" }. Health checks probe these."

  validation {
    condition     = alltrue([for key in ["region1", "region2"] : contains(keys(var.region_hostnames), key)])
    error_message = "region_hostnames needs the keys region1 and region2."
  }
}

variable "load_balancers" {
  type = map(object({
    dns_name = string
    zone_id  = string
  }))
  description = "ALB DNS name and canonical zone ID per region, keyed region1 and region2."
}

variable "health_check_path" {
  type        = string
  description = "Path probed by the Route 53 health checks."
  default     = "/readyz"
}

variable "health_check_failure_threshold" {
  type        = number
  description = "Consecutive failed probes before a region is declared unhealthy."
  default     = 3
}

variable "health_check_interval_seconds" {
  type        = number
  description = "Seconds between probes from each checker (10 costs more, fails over faster; 30 is standard)."
  default     = 30

  validation {
    condition     = contains([10, 30], var.health_check_interval_seconds)
    error_message = "Route 53 supports 10 or 30 seconds."
  }
}

variable "leader_health_check_path" {
  type        = string
  description = "Path probed by the write record's health checks: the Write API's GET /leader (200 only in the write region)."
  default     = "/leader"
}

variable "leader_health_check_failure_threshold" {
  type        = number
  description = "Consecutive probes that must agree before a region's leader check changes state (both ways)."
  default     = 2
}

variable "leader_health_check_interval_seconds" {
  type        = number
  description = "Seconds between the leader probes from each checker: 10 (the default, billed extra) moves the write record about 20 s after a switchover, 30 about a minute."
  default     = 10

  validation {
    condition     = contains([10, 30], var.leader_health_check_interval_seconds)
    error_message = "Route 53 supports 10 or 30 seconds."
  }
}

variable "record_ttl_seconds" {
  type        = number
  description = "TTL of the ACM validation records."
  default     = 300
}

variable "tags" {
  type        = map(string)
  description = "Tags added to every resource of the module."
  default     = {}
}
