variable "state_bucket" {
  type        = string
  description = "S3 bucket holding the state of terraform/deployments/tandem, e.g. 123456789012-tandem-tfstate."
}

variable "state_region" {
  type        = string
  description = "Region of state_bucket (Region 1)."
}

variable "state_key" {
  type        = string
  description = "State key of terraform/deployments/tandem (its backend.tf)."
  default     = "tandem/deployments/tandem.tfstate"
}
