terraform {
  # use_lockfile (S3-native state locking) needs Terraform 1.10 or newer.
  required_version = ">= 1.10.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.80, < 7.0"
    }
    kafka = {
      source  = "Mongey/kafka"
      version = ">= 0.13.1, < 0.14.0"
    }
  }
}

provider "aws" {
  region = local.inputs.region
}

# SASL/SCRAM-SHA-512 over TLS against the cluster's bootstrap brokers, as the
# admin user. The brokers' certificates chain to Amazon's public CAs, which the
# system trust store has. The provider connects only when it reads or changes
# an ACL, so this directory plans and applies only from a machine that reaches
# the brokers on 9096 (inside either VPC; docs/deploy.md, "Kafka ACLs").
provider "kafka" {
  bootstrap_servers = split(",", local.inputs.bootstrap_brokers)
  tls_enabled       = true
  sasl_mechanism    = "scram-sha512"
  sasl_username     = local.admin.username
  sasl_password     = local.admin.password
  kafka_version     = local.inputs.kafka_version
  timeout           = 60
}
