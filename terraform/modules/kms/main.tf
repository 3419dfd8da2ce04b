################################################################################
# One customer managed key per region
#
# Every data store of a region (RDS, ElastiCache, MSK, the Secrets Manager
# secrets, CloudWatch log groups, EKS envelope encryption, ECR, Lambda
# environment variables) is encrypted with this key. One key per region keeps
# the key policy reviewable in one place; the services reach it through grants
# made with the caller's IAM permissions, except CloudWatch Logs, which needs the
# explicit service statement below.
################################################################################

data "aws_caller_identity" "current" {}

data "aws_partition" "current" {}

data "aws_region" "current" {}

locals {
  account_root = "arn:${data.aws_partition.current.partition}:iam::${data.aws_caller_identity.current.account_id}:root"
  logs_service = "logs.${data.aws_region.current.name}.amazonaws.com"
}

################################################################################
# Key policy
################################################################################

data "aws_iam_policy_document" "key" {
  # checkov:skip=CKV_AWS_109:A key policy's "*" resource means this key only; the root statement delegates to IAM policies exactly like AWS's default key policy.
  # checkov:skip=CKV_AWS_111:The "*" resource means this key only. EnableIamPolicies gives the account kms:* on it without conditions (AWS's default key policy): every IAM principal whose IAM policy allows kms actions on this key, administrators included, can use and manage it; the constraints are in those IAM policies (workload roles get kms:Decrypt only with kms:ViaService). AllowCloudWatchLogs lets the regional Logs service encrypt and decrypt only for this account's log groups.
  # checkov:skip=CKV_AWS_356:A key policy's "*" resource means this key only; key policies cannot name the key's own ARN before it exists.
  # Delegate to IAM: workload roles get kms:Decrypt in their own policies,
  # scoped with kms:ViaService where the call always goes through a service.
  statement {
    sid       = "EnableIamPolicies"
    actions   = ["kms:*"]
    resources = ["*"]

    principals {
      type        = "AWS"
      identifiers = [local.account_root]
    }
  }

  statement {
    sid = "AllowCloudWatchLogs"
    actions = [
      "kms:Encrypt*",
      "kms:Decrypt*",
      "kms:ReEncrypt*",
      "kms:GenerateDataKey*",
      "kms:Describe*",
    ]
    resources = ["*"]

    principals {
      type        = "Service"
      identifiers = [local.logs_service]
    }

    condition {
      test     = "ArnLike"
      variable = "kms:EncryptionContext:aws:logs:arn"
      values   = ["arn:${data.aws_partition.current.partition}:logs:${data.aws_region.current.name}:${data.aws_caller_identity.current.account_id}:*"]
    }
  }
}

################################################################################
# Key and alias
################################################################################

resource "aws_kms_key" "this" {
  description             = var.description
  enable_key_rotation     = true
  deletion_window_in_days = var.deletion_window_in_days
  policy                  = data.aws_iam_policy_document.key.json
  tags                    = var.tags
}

resource "aws_kms_alias" "this" {
  name          = "alias/${var.name}"
  target_key_id = aws_kms_key.this.key_id
}
