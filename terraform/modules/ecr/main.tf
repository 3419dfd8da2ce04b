################################################################################
# Lookups
################################################################################

data "aws_caller_identity" "current" {}

data "aws_region" "replica" {
  provider = aws.replica
}

locals {
  lifecycle_policy = jsonencode({
    rules = [
      {
        rulePriority = 1
        description  = "Expire untagged images"
        selection = {
          tagStatus   = "untagged"
          countType   = "sinceImagePushed"
          countUnit   = "days"
          countNumber = var.untagged_expiry_days
        }
        action = { type = "expire" }
      },
      {
        rulePriority = 2
        description  = "Keep the newest tagged images"
        selection = {
          tagStatus   = "any"
          countType   = "imageCountMoreThan"
          countNumber = var.max_tagged_images
        }
        action = { type = "expire" }
      },
    ]
  })
}

################################################################################
# Repositories (primary region)
################################################################################

resource "aws_ecr_repository" "this" {
  for_each = toset(var.repository_names)

  name                 = each.value
  image_tag_mutability = "IMMUTABLE"

  image_scanning_configuration {
    scan_on_push = true
  }

  encryption_configuration {
    encryption_type = "KMS"
    kms_key         = var.kms_key_arn
  }

  tags = var.tags
}

resource "aws_ecr_lifecycle_policy" "this" {
  for_each = aws_ecr_repository.this

  repository = each.value.name
  policy     = local.lifecycle_policy
}

################################################################################
# Cross-region replication
#
# The release workflow pushes to the primary region only; ECR copies every
# image to the replica region, where the Region 2 cluster pulls it. The
# replication configuration is a registry-wide singleton: this module must be
# the only place in the account that manages it.
################################################################################

resource "aws_ecr_replication_configuration" "this" {
  replication_configuration {
    rule {
      destination {
        region      = data.aws_region.replica.name
        registry_id = data.aws_caller_identity.current.account_id
      }

      dynamic "repository_filter" {
        for_each = toset(var.repository_names)

        content {
          filter      = repository_filter.value
          filter_type = "PREFIX_MATCH"
        }
      }
    }
  }
}

# Replicated repositories are created by ECR on first push; the creation
# template gives them the same immutability, KMS encryption and lifecycle as
# the source. KMS encryption in a template requires a role ECR can assume.
data "aws_iam_policy_document" "template_assume" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ecr.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "template" {
  name               = "tandem-ecr-replica-template-${data.aws_region.replica.name}"
  assume_role_policy = data.aws_iam_policy_document.template_assume.json
  tags               = var.tags
}

data "aws_iam_policy_document" "template" {
  statement {
    sid = "CreateReplicatedRepositories"
    actions = [
      "ecr:CreateRepository",
      "ecr:PutLifecyclePolicy",
      "ecr:TagResource",
    ]
    resources = [for name in var.repository_names : "arn:aws:ecr:${data.aws_region.replica.name}:${data.aws_caller_identity.current.account_id}:repository/${name}"]
  }

  statement {
    sid = "EncryptReplicatedRepositories"
    actions = [
      "kms:CreateGrant",
      "kms:DescribeKey",
      "kms:Encrypt",
      "kms:Decrypt",
      "kms:GenerateDataKey",
    ]
    resources = [var.replica_kms_key_arn]
  }
}

resource "aws_iam_role_policy" "template" {
  name   = "create-replicated-repositories"
  role   = aws_iam_role.template.id
  policy = data.aws_iam_policy_document.template.json
}

resource "aws_ecr_repository_creation_template" "replica" {
  for_each = toset(var.repository_names)
  provider = aws.replica

  prefix               = each.value
  description          = "Replicated Tandem image repository ${each.value}"
  applied_for          = ["REPLICATION"]
  image_tag_mutability = "IMMUTABLE"
  custom_role_arn      = aws_iam_role.template.arn
  lifecycle_policy     = local.lifecycle_policy
  resource_tags        = var.tags

  encryption_configuration {
    encryption_type = "KMS"
    kms_key         = var.replica_kms_key_arn
  }
}
