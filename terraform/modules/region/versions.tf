terraform {
  required_version = ">= 1.6.0"

  # The caller passes each region's aws configuration as this module's default
  # aws provider (providers = { aws = aws.region2, ... }); the child modules
  # inherit it.
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.80, < 7.0"
    }
    random = {
      source  = "hashicorp/random"
      version = ">= 3.6, < 4.0"
    }
    tls = {
      source  = "hashicorp/tls"
      version = ">= 4.0, < 5.0"
    }
  }
}
