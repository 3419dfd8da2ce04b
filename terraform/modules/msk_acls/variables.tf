variable "topic" {
  type        = string
  description = "Topic of the document events (KAFKA_TOPIC of the relay and the consumer), e.g. tandem.documents."

  validation {
    condition     = can(regex("^[A-Za-z0-9._-]{1,249}$", var.topic))
    error_message = "topic must be a Kafka topic name (letters, digits, '.', '_', '-')."
  }
}

variable "consumer_group" {
  type        = string
  description = "Consumer group of the Region 2 consumer (KAFKA_GROUP_ID in eks/base/region2-consumer)."
  default     = "tandem-region2"
}

variable "admin_principal" {
  type        = string
  description = "Principal that manages the ACLs (User:<SCRAM user name>); the provider authenticates as this user."

  validation {
    condition     = startswith(var.admin_principal, "User:")
    error_message = "admin_principal must look like User:<name>."
  }
}

variable "relay_principal" {
  type        = string
  description = "Principal of the outbox relay, the topic's only producer (User:<SCRAM user name>)."

  validation {
    condition     = startswith(var.relay_principal, "User:")
    error_message = "relay_principal must look like User:<name>."
  }
}

variable "consumer_principal" {
  type        = string
  description = "Principal of the Region 2 consumer, the topic's only reader (User:<SCRAM user name>)."

  validation {
    condition     = startswith(var.consumer_principal, "User:")
    error_message = "consumer_principal must look like User:<name>."
  }
}
