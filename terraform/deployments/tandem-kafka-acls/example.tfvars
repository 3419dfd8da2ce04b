# Copy to terraform.tfvars (git-ignored) and fill in. Values here are examples.

state_bucket = "123456789012-tandem-tfstate"
state_region = "us-east-1"
