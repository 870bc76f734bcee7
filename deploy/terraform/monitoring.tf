# Logs and alarms. The alarms watch the conditions of deploy/prometheus/rules.yml,
# on the metrics the CloudWatch agent scrapes from /metrics (see user-data.sh.tftpl);
# the agent sends counters as their increase since its previous scrape.

resource "aws_cloudwatch_log_group" "quiver" {
  name              = "/quiver/${var.name}"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.quiver.arn
}

resource "aws_sns_topic" "alarms" {
  name_prefix       = "${var.name}-alarms-"
  kms_master_key_id = aws_kms_key.quiver.id
}

resource "aws_sns_topic_subscription" "email" {
  for_each  = toset(var.alarm_emails)
  topic_arn = aws_sns_topic.alarms.arn
  protocol  = "email"
  endpoint  = each.value
}

locals {
  alarm_actions = [aws_sns_topic.alarms.arn]
  # Simple threshold alarms: name => (metric, statistic, threshold, minutes, severity, text).
  simple_alarms = {
    flush-failing = {
      metric = "quiver_flush_failures_total", stat = "Sum", threshold = 0, minutes = 1
      text   = "Flushes to the store fail; events wait in the WAL (rules.yml: QuiverFlushFailing)."
    }
    flush-lagging = {
      metric = "quiver_buffer_bytes", stat = "Maximum", threshold = 209715200, minutes = 5
      text   = "Over 200 MiB waits in live buffers; flushes do not keep up (QuiverFlushLagging)."
    }
    view-checkpoint-failing = {
      metric = "quiver_view_checkpoint_failures_total", stat = "Sum", threshold = 0, minutes = 1
      text   = "View checkpoints fail (QuiverViewCheckpointFailing)."
    }
    backup-failing = {
      metric = "quiver_backup_failures_total", stat = "Sum", threshold = 0, minutes = 1
      text   = "A scheduled backup failed (set QUIVER_BACKUP_TO in quiver_flags to turn them on; QuiverBackupStale)."
    }
    push-queue-saturated = {
      metric = "quiver_ws_queue_bytes", stat = "Maximum", threshold = 209715200, minutes = 5
      text   = "Over 200 MiB queued for WebSocket subscribers (QuiverPushQueueSaturated)."
    }
  }
}

resource "aws_cloudwatch_metric_alarm" "simple" {
  for_each            = local.simple_alarms
  alarm_name          = "${var.name}-${each.key}"
  alarm_description   = each.value.text
  namespace           = local.metric_namespace
  metric_name         = each.value.metric
  statistic           = each.value.stat
  period              = 60
  evaluation_periods  = each.value.minutes
  threshold           = each.value.threshold
  comparison_operator = "GreaterThanThreshold"
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
}

resource "aws_cloudwatch_metric_alarm" "down" {
  alarm_name          = "${var.name}-down"
  alarm_description   = "No healthy Quiver node behind the load balancer for 2 minutes (QuiverDown)."
  namespace           = "AWS/NetworkELB"
  metric_name         = "HealthyHostCount"
  dimensions = {
    LoadBalancer = aws_lb.quiver.arn_suffix
    TargetGroup  = aws_lb_target_group.node["http"].arn_suffix
  }
  statistic           = "Minimum"
  period              = 60
  evaluation_periods  = 2
  threshold           = 1
  comparison_operator = "LessThanThreshold"
  treat_missing_data  = "breaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
}

resource "aws_cloudwatch_metric_alarm" "ingest_refused" {
  alarm_name          = "${var.name}-ingest-refused"
  alarm_description   = "Ingest requests refused by the server (503 or 500) for 2 minutes (QuiverIngestRefused)."
  comparison_operator = "GreaterThanThreshold"
  threshold           = 0
  evaluation_periods  = 2
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
  metric_query {
    id          = "refused"
    expression  = "FILL(unavailable, 0) + FILL(internal, 0)"
    label       = "server-side ingest refusals"
    return_data = true
  }
  dynamic "metric_query" {
    for_each = ["unavailable", "internal"]
    content {
      id = metric_query.value
      metric {
        namespace   = local.metric_namespace
        metric_name = "quiver_ingest_rejects_total"
        dimensions  = { reason = metric_query.value }
        period      = 60
        stat        = "Sum"
      }
    }
  }
}

resource "aws_cloudwatch_metric_alarm" "query_timeouts" {
  alarm_name          = "${var.name}-query-timeouts"
  alarm_description   = "SQL queries hit --query-timeout (QuiverQueryTimeouts)."
  namespace           = local.metric_namespace
  metric_name         = "quiver_sql_queries_total"
  dimensions          = { outcome = "query_timeout" }
  statistic           = "Sum"
  period              = 600
  evaluation_periods  = 1
  threshold           = 6
  comparison_operator = "GreaterThanThreshold"
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
}

# Mean latencies from a histogram's sum and count (CloudWatch has no buckets).
resource "aws_cloudwatch_metric_alarm" "mean_latency" {
  for_each = {
    wal-fsync-slow = { histogram = "quiver_wal_fsync_seconds", threshold = 0.02, text = "Mean WAL fsync above 20 ms for 5 minutes (QuiverWalFsyncSlow)." }
    view-lagging   = { histogram = "quiver_view_freshness_seconds", threshold = 0.5, text = "Mean view freshness above 500 ms for 5 minutes (QuiverViewLagging)." }
  }
  alarm_name          = "${var.name}-${each.key}"
  alarm_description   = each.value.text
  comparison_operator = "GreaterThanThreshold"
  threshold           = each.value.threshold
  evaluation_periods  = 5
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
  metric_query {
    id          = "mean"
    expression  = "total / IF(n > 0, n, 1)"
    label       = "mean seconds"
    return_data = true
  }
  metric_query {
    id = "total"
    metric {
      namespace   = local.metric_namespace
      metric_name = "${each.value.histogram}_sum"
      period      = 60
      stat        = "Sum"
    }
  }
  metric_query {
    id = "n"
    metric {
      namespace   = local.metric_namespace
      metric_name = "${each.value.histogram}_count"
      period      = 60
      stat        = "Sum"
    }
  }
}

resource "aws_cloudwatch_metric_alarm" "memory" {
  alarm_name          = "${var.name}-memory-near-limit"
  alarm_description   = "RSS above 90% of the memory limit for 5 minutes (QuiverMemoryNearLimit)."
  comparison_operator = "GreaterThanThreshold"
  threshold           = 0.9
  evaluation_periods  = 5
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
  metric_query {
    id          = "share"
    expression  = "rss / limit"
    label       = "share of the memory limit"
    return_data = true
  }
  metric_query {
    id = "rss"
    metric {
      namespace   = local.metric_namespace
      metric_name = "process_resident_memory_bytes"
      period      = 60
      stat        = "Maximum"
    }
  }
  metric_query {
    id = "limit"
    metric {
      namespace   = local.metric_namespace
      metric_name = "quiver_memory_limit_bytes"
      period      = 60
      stat        = "Minimum"
    }
  }
}
