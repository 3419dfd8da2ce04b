################################################################################
# Remote state
#
# Same bucket as terraform/deployments/tandem, its own key. Bucket and region
# are passed at init time, as for the main deployment:
#
#   terraform init \
#     -backend-config="bucket=<account>-tandem-tfstate" \
#     -backend-config="region=<region1>"
################################################################################

terraform {
  backend "s3" {
    key          = "tandem/deployments/tandem-kafka-acls.tfstate"
    encrypt      = true
    use_lockfile = true
  }
}
