variable "streams" {
  type = map(object({
    topic              = string
    relay_principal    = string
    consumer_principal = string
    consumer_group     = string
  }))
  description = "One stream per direction, keyed by the region whose outbox the topic carries (region1, region2): the topic (KAFKA_TOPIC of that region's relay and of the other region's consumer), the principal of the relay that writes it and of the consumer that reads it (User:<SCRAM user name>), and that consumer's group (its KAFKA_GROUP_ID)."

  validation {
    condition     = alltrue([for stream in values(var.streams) : can(regex("^[A-Za-z0-9._-]{1,249}$", stream.topic))])
    error_message = "every topic must be a Kafka topic name (letters, digits, '.', '_', '-')."
  }

  validation {
    condition     = alltrue([for stream in values(var.streams) : startswith(stream.relay_principal, "User:") && startswith(stream.consumer_principal, "User:")])
    error_message = "relay_principal and consumer_principal must look like User:<name>."
  }

  validation {
    condition     = length(distinct([for stream in values(var.streams) : stream.topic])) == length(var.streams)
    error_message = "each stream needs its own topic."
  }
}

variable "admin_principal" {
  type        = string
  description = "Principal that manages the ACLs (User:<SCRAM user name>); the provider authenticates as this user."

  validation {
    condition     = startswith(var.admin_principal, "User:")
    error_message = "admin_principal must look like User:<name>."
  }
}
