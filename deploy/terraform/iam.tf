# The node's role: its store prefix and nothing else of the bucket, its log group, its
# WAL volume, its TLS secret, and Session Manager instead of SSH.

data "aws_iam_policy_document" "assume_ec2" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "node" {
  name_prefix        = "${var.name}-node-"
  assume_role_policy = data.aws_iam_policy_document.assume_ec2.json
}

resource "aws_iam_instance_profile" "node" {
  name_prefix = "${var.name}-node-"
  role        = aws_iam_role.node.name
}

resource "aws_iam_role_policy_attachment" "ssm" {
  role       = aws_iam_role.node.name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/AmazonSSMManagedInstanceCore"
}

data "aws_iam_policy_document" "node" {
  statement {
    sid       = "ListStorePrefix"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.store.arn]
    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = ["${var.store_prefix}/*", var.store_prefix]
    }
  }
  statement {
    sid       = "ObjectsUnderStorePrefix"
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"]
    resources = ["${aws_s3_bucket.store.arn}/${var.store_prefix}/*"]
  }
  statement {
    sid       = "StoreKey"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = [aws_kms_key.quiver.arn]
  }
  statement {
    sid       = "Logs"
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"]
    resources = ["${aws_cloudwatch_log_group.quiver.arn}:*"]
  }
  statement {
    sid       = "Metrics"
    actions   = ["cloudwatch:PutMetricData"]
    resources = ["*"] # PutMetricData has no resource type; the condition scopes it.
    condition {
      test     = "StringEquals"
      variable = "cloudwatch:namespace"
      values   = [local.metric_namespace]
    }
  }
  statement {
    sid       = "AttachOwnWalVolume"
    actions   = ["ec2:AttachVolume"]
    resources = [
      aws_ebs_volume.wal.arn,
      "arn:${data.aws_partition.current.partition}:ec2:${var.region}:${data.aws_caller_identity.current.account_id}:instance/*",
    ]
    condition {
      test     = "StringEquals"
      variable = "aws:ResourceTag/QuiverNode"
      values   = [var.name]
    }
  }
  statement {
    sid       = "DescribeVolumes"
    actions   = ["ec2:DescribeVolumes"]
    resources = ["*"] # Describe calls have no resource-level permissions.
  }
  statement {
    sid       = "TlsSecret"
    actions   = ["secretsmanager:GetSecretValue"]
    resources = [var.pg_tls_secret_arn, var.admin_token_secret_arn]
  }
}

resource "aws_iam_role_policy" "node" {
  name_prefix = "${var.name}-node-"
  role        = aws_iam_role.node.id
  policy      = data.aws_iam_policy_document.node.json
}
