terraform {
  required_version = ">= 1.6.0"

  required_providers {
    # Kafka ACLs are Kafka objects, not AWS resources: the AWS provider cannot
    # create them. This provider speaks the Kafka protocol to the brokers.
    kafka = {
      source  = "Mongey/kafka"
      version = ">= 0.13.1, < 0.14.0"
    }
  }
}
