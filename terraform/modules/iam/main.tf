################################################################################
# Lookups
################################################################################

data "aws_region" "current" {}

################################################################################
# Trust: one Kubernetes service account per role
################################################################################

data "aws_iam_policy_document" "assume" {
  for_each = var.workloads

  statement {
    actions = ["sts:AssumeRoleWithWebIdentity"]

    principals {
      type        = "Federated"
      identifiers = [var.oidc_provider_arn]
    }

    condition {
      test     = "StringEquals"
      variable = "${var.oidc_issuer}:sub"
      values   = ["system:serviceaccount:${var.namespace}:${each.value.service_account}"]
    }

    condition {
      test     = "StringEquals"
      variable = "${var.oidc_issuer}:aud"
      values   = ["sts.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "workload" {
  for_each = var.workloads

  name                 = "${var.name_prefix}-${each.key}"
  description          = "IRSA role of ${var.namespace}/${each.value.service_account}"
  assume_role_policy   = data.aws_iam_policy_document.assume[each.key].json
  max_session_duration = 3600
  tags                 = merge(var.tags, { "tandem/workload" = each.key })
}

################################################################################
# Permissions: only the secrets (and database users) each workload needs
################################################################################

data "aws_iam_policy_document" "workload" {
  for_each = var.workloads

  statement {
    sid       = "ReadOwnSecrets"
    actions   = ["secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret"]
    resources = each.value.secret_arns
  }

  statement {
    sid       = "DecryptSecretsOnly"
    actions   = ["kms:Decrypt"]
    resources = [var.kms_key_arn]

    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values   = ["secretsmanager.${data.aws_region.current.name}.amazonaws.com"]
    }
  }

  dynamic "statement" {
    for_each = length(each.value.rds_db_user_arns) > 0 ? [1] : []

    content {
      sid       = "ConnectWithIamAuth"
      actions   = ["rds-db:connect"]
      resources = each.value.rds_db_user_arns
    }
  }
}

resource "aws_iam_role_policy" "workload" {
  for_each = var.workloads

  name   = "tandem-${each.key}"
  role   = aws_iam_role.workload[each.key].id
  policy = data.aws_iam_policy_document.workload[each.key].json
}
