# The store: one bucket holding the Delta tables, the _quiver catalog, view checkpoints
# and report files under var.store_prefix; encrypted with a key of its own.

resource "aws_kms_key" "quiver" {
  description             = "${var.name}: store, logs and alarm topic"
  deletion_window_in_days = 30
  enable_key_rotation     = true
  policy                  = data.aws_iam_policy_document.kms.json
}

resource "aws_kms_alias" "quiver" {
  name          = "alias/${var.name}"
  target_key_id = aws_kms_key.quiver.key_id
}

data "aws_iam_policy_document" "kms" {
  # In a key policy, resource "*" means this key only, and the account root statement is
  # what lets IAM policies grant the key at all (AWS's default key policy).
  # checkov:skip=CKV_AWS_111:Key policy: "*" is the key itself.
  # checkov:skip=CKV_AWS_356:Key policy: "*" is the key itself.
  # checkov:skip=CKV_AWS_109:Key policy: the account administers its own key.
  # The account administers the key (the AWS default).
  statement {
    sid       = "Account"
    actions   = ["kms:*"]
    resources = ["*"]
    principals {
      type        = "AWS"
      identifiers = ["arn:${data.aws_partition.current.partition}:iam::${data.aws_caller_identity.current.account_id}:root"]
    }
  }
  # CloudWatch Logs and SNS encrypt with it.
  statement {
    sid       = "Services"
    actions   = ["kms:Encrypt*", "kms:Decrypt*", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:Describe*"]
    resources = ["*"]
    principals {
      type        = "Service"
      identifiers = ["logs.${var.region}.amazonaws.com", "cloudwatch.amazonaws.com", "sns.amazonaws.com"]
    }
  }
}

resource "aws_s3_bucket" "store" {
  # checkov:skip=CKV_AWS_144:Cross-region replication is a choice of the DR plan; `quiver backup --to s3://other-region-bucket` copies consistent versions instead.
  # checkov:skip=CKV_AWS_18:Server access logs go to the organisation's central log bucket, which this module does not own; CloudTrail data events cover object access.
  # checkov:skip=CKV2_AWS_62:Nothing consumes bucket events; Quiver reads the Delta log itself.
  bucket_prefix = "${var.name}-store-"
  force_destroy = false
}

resource "aws_s3_bucket_ownership_controls" "store" {
  bucket = aws_s3_bucket.store.id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_public_access_block" "store" {
  bucket                  = aws_s3_bucket.store.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_versioning" "store" {
  bucket = aws_s3_bucket.store.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "store" {
  bucket = aws_s3_bucket.store.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.quiver.arn
    }
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "store" {
  bucket = aws_s3_bucket.store.id

  # Delta files removed by vacuum and replaced catalog documents stay recoverable as
  # noncurrent versions for a while, then go.
  rule {
    id     = "old-versions"
    status = "Enabled"
    filter {
      prefix = "${var.store_prefix}/"
    }
    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_version_days
    }
    expired_object_delete_marker = true
  }

  rule {
    id     = "abandoned-uploads"
    status = "Enabled"
    filter {}
    abort_incomplete_multipart_upload {
      days_after_initiation = 2
    }
  }

  rule {
    id     = "report-files"
    status = "Enabled"
    filter {
      prefix = "${var.store_prefix}/reports/"
    }
    expiration {
      days = var.report_file_days
    }
    noncurrent_version_expiration {
      noncurrent_days = 1
    }
  }
}

# Only TLS, and only from inside the account.
resource "aws_s3_bucket_policy" "store" {
  bucket = aws_s3_bucket.store.id
  policy = data.aws_iam_policy_document.store_bucket.json
}

data "aws_iam_policy_document" "store_bucket" {
  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.store.arn, "${aws_s3_bucket.store.arn}/*"]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}
