################################################################################
# Remote state
#
# State lives in a versioned, encrypted S3 bucket in Region 1. Locking uses an
# S3 lock object next to the state (use_lockfile, Terraform >= 1.10), so no
# DynamoDB table is needed. Teams on an older Terraform can instead pass
# dynamodb_table = "<table with a LockID string hash key>".
#
# Bucket and region are account specific and passed at init time (see
# docs/deploy.md, "Bootstrap remote state"):
#
#   terraform init \
#     -backend-config="bucket=<account>-tandem-tfstate" \
#     -backend-config="region=<region1>"
################################################################################

terraform {
  backend "s3" {
    key          = "tandem/deployments/tandem.tfstate"
    encrypt      = true
    use_lockfile = true
  }
}
