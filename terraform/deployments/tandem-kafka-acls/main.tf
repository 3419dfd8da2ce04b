################################################################################
# Tandem: Kafka ACLs on the MSK cluster of terraform/deployments/tandem
#
# A separate root because the Kafka provider talks to the brokers themselves,
# and they are reachable only from inside the two VPCs: the main deployment
# must stay plannable from anywhere (the CI plan job, an operator's laptop).
# Apply it from a machine in a Tandem VPC (docs/deploy.md, "Kafka ACLs"). A
# new (or replaced) cluster has no ACLs: apply the main deployment with
# kafka_acl_bootstrap = true first, then this, then the main one without it.
################################################################################

data "terraform_remote_state" "tandem" {
  backend = "s3"

  config = {
    bucket = var.state_bucket
    key    = var.state_key
    region = var.state_region
  }
}

locals {
  # Cluster, brokers, streams (per direction: topic, relay and consumer
  # principals, consumer group), principals and admin secret, from the main
  # deployment's outputs: one source for the topic, group and user names.
  inputs = data.terraform_remote_state.tandem.outputs.kafka_acl_inputs

  admin = jsondecode(data.aws_secretsmanager_secret_version.admin.secret_string)
}

# The admin's SCRAM credentials (AmazonMSK_<cluster>_admin); no workload can
# read this secret.
data "aws_secretsmanager_secret_version" "admin" {
  secret_id = local.inputs.admin_secret_arn
}

################################################################################
# ACLs
################################################################################

module "acls" {
  source = "../../modules/msk_acls"

  streams         = local.inputs.streams
  admin_principal = local.inputs.principals["admin"]
}
