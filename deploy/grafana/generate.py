#!/usr/bin/env python3
"""Writes Quiver's Grafana dashboards (dashboards/*.json) from the panel lists below.

The JSON files are committed; edit this file and run it again rather than editing them
by hand. The test command checks that they are what this script writes and that every
Quiver metric they query is one the server exports.
"""
import json
import pathlib

HERE = pathlib.Path(__file__).parent
DS = {"type": "prometheus", "uid": "prometheus"}

# Each dashboard: title, then panels as (title, unit, [(PromQL, legend)], kind).
DASHBOARDS = {
    "ingest": ("Quiver · Ingest", [
        ("Events accepted /s by stream", "ops",
         [('sum by (stream) (rate(quiver_ingest_events_total{job="quiver"}[1m]))', "{{stream}}")], "timeseries"),
        ("Requests refused /s by reason", "reqps",
         [('sum by (reason) (rate(quiver_ingest_rejects_total{job="quiver"}[1m]))', "{{reason}}")], "timeseries"),
        ("Bytes accepted /s", "Bps",
         [('sum(rate(quiver_ingest_bytes_total{job="quiver"}[1m]))', "bytes")], "timeseries"),
        ("Writes that waited for buffer room /s", "ops",
         [('rate(quiver_ingest_waits_total{job="quiver"}[1m])', "waits")], "timeseries"),
        ("Wait for buffer room p99", "s",
         [('histogram_quantile(0.99, sum by (le) (rate(quiver_ingest_wait_seconds_bucket{job="quiver"}[5m])))', "p99")], "timeseries"),
        ("WAL fsync latency", "s",
         [('histogram_quantile(0.5, sum by (le) (rate(quiver_wal_fsync_seconds_bucket{job="quiver"}[5m])))', "p50"),
          ('histogram_quantile(0.99, sum by (le) (rate(quiver_wal_fsync_seconds_bucket{job="quiver"}[5m])))', "p99")], "timeseries"),
        ("WAL bytes written /s", "Bps",
         [('rate(quiver_wal_bytes_total{job="quiver"}[1m])', "wal")], "timeseries"),
    ]),
    "storage": ("Quiver · Storage", [
        ("Events flushed to Delta /s", "ops",
         [('sum by (stream) (rate(quiver_flush_events_total{job="quiver"}[1m]))', "{{stream}}")], "timeseries"),
        ("Flush duration p99", "s",
         [('histogram_quantile(0.99, sum by (le, stream) (rate(quiver_flush_seconds_bucket{job="quiver"}[5m])))', "{{stream}}")], "timeseries"),
        ("Flush failures", "short",
         [('sum by (stream) (increase(quiver_flush_failures_total{job="quiver"}[10m]))', "{{stream}}")], "timeseries"),
        ("Bytes waiting in buffers", "bytes",
         [('sum by (stream) (quiver_buffer_bytes{job="quiver"})', "{{stream}}")], "timeseries"),
        ("Compactions, checkpoints, vacuumed files (1h)", "short",
         [('sum(increase(quiver_table_compactions_total{job="quiver"}[1h]))', "compactions"),
          ('sum(increase(quiver_table_checkpoints_total{job="quiver"}[1h]))', "checkpoints"),
          ('sum(increase(quiver_table_vacuumed_files_total{job="quiver"}[1h]))', "vacuumed files")], "timeseries"),
        ("WAL segments deleted after commit /s", "ops",
         [('rate(quiver_wal_segments_deleted_total{job="quiver"}[5m])', "segments")], "timeseries"),
    ]),
    "queries": ("Quiver · Queries", [
        ("SQL statements /s by outcome", "ops",
         [('sum by (outcome) (rate(quiver_sql_queries_total{job="quiver"}[1m]))', "{{outcome}}")], "timeseries"),
        ("Query duration", "s",
         [('histogram_quantile(0.5, sum by (le) (rate(quiver_sql_query_seconds_bucket{job="quiver"}[5m])))', "p50"),
          ('histogram_quantile(0.99, sum by (le) (rate(quiver_sql_query_seconds_bucket{job="quiver"}[5m])))', "p99")], "timeseries"),
        ("Queries running", "short",
         [('quiver_sql_active_queries{job="quiver"}', "running")], "stat"),
        ("Spilled to disk /s", "Bps",
         [('rate(quiver_sql_spilled_bytes_total{job="quiver"}[5m])', "bytes")], "timeseries"),
        ("HTTP p99 by route", "s",
         [('histogram_quantile(0.99, sum by (le, route) (rate(quiver_http_request_seconds_bucket{job="quiver"}[5m])))', "{{route}}")], "timeseries"),
        ("HTTP answers /s by status", "reqps",
         [('sum by (status) (rate(quiver_http_request_seconds_count{job="quiver"}[1m]))', "{{status}}")], "timeseries"),
    ]),
    "views": ("Quiver · Views", [
        ("Freshness: ingest to view change", "s",
         [('histogram_quantile(0.5, sum by (le) (rate(quiver_view_freshness_seconds_bucket{job="quiver"}[5m])))', "p50"),
          ('histogram_quantile(0.99, sum by (le) (rate(quiver_view_freshness_seconds_bucket{job="quiver"}[5m])))', "p99")], "timeseries"),
        ("Change sets /s by view", "ops",
         [('sum by (view) (rate(quiver_view_changes_total{job="quiver"}[1m]))', "{{view}}")], "timeseries"),
        ("Rows by view", "short",
         [('quiver_view_rows{job="quiver"}', "{{view}}")], "timeseries"),
        ("State bytes by tier", "bytes",
         [('sum by (tier) (quiver_view_state_bytes{job="quiver"})', "{{tier}}")], "timeseries"),
        ("Checkpoint pause p99 and duration p99", "s",
         [('histogram_quantile(0.99, sum by (le) (rate(quiver_view_checkpoint_pause_seconds_bucket{job="quiver"}[15m])))', "pause"),
          ('histogram_quantile(0.99, sum by (le) (rate(quiver_view_checkpoint_seconds_bucket{job="quiver"}[15m])))', "duration")], "timeseries"),
        ("Checkpoint failures (1h)", "short",
         [('increase(quiver_view_checkpoint_failures_total{job="quiver"}[1h])', "failures")], "stat"),
    ]),
    "push": ("Quiver · Push", [
        ("WebSocket connections and subscriptions", "short",
         [('quiver_ws_connections{job="quiver"}', "connections"),
          ('quiver_ws_subscriptions{job="quiver"}', "subscriptions")], "timeseries"),
        ("Delivery latency (change to frame written)", "s",
         [('histogram_quantile(0.5, sum by (le) (rate(quiver_ws_delivery_seconds_bucket{job="quiver"}[5m])))', "p50"),
          ('histogram_quantile(0.99, sum by (le) (rate(quiver_ws_delivery_seconds_bucket{job="quiver"}[5m])))', "p99")], "timeseries"),
        ("Bytes queued for subscribers", "bytes",
         [('quiver_ws_queue_bytes{job="quiver"}', "queued")], "timeseries"),
        ("Frames and bytes sent /s", "ops",
         [('rate(quiver_ws_frames_sent_total{job="quiver"}[1m])', "frames"),
          ('rate(quiver_ws_bytes_sent_total{job="quiver"}[1m])', "bytes")], "timeseries"),
        ("Slow subscribers: folded, caught up, resnapshotted /s", "ops",
         [('rate(quiver_ws_coalesced_total{job="quiver"}[5m])', "folded"),
          ('rate(quiver_ws_catch_ups_total{job="quiver"}[5m])', "caught up"),
          ('rate(quiver_ws_resnapshots_total{job="quiver"}[5m])', "resnapshots")], "timeseries"),
        ("Connections closed /s by reason", "ops",
         [('sum by (code) (rate(quiver_ws_closed_total{job="quiver"}[5m]))', "{{code}}")], "timeseries"),
    ]),
    "host": ("Quiver · Host", [
        ("Memory: RSS, live allocations, limit", "bytes",
         [('process_resident_memory_bytes{job="quiver"}', "rss"),
          ('quiver_memory_allocated_bytes{job="quiver"}', "live allocations"),
          ('quiver_memory_limit_bytes{job="quiver"}', "limit")], "timeseries"),
        ("CPU busy", "percentunit",
         [('1 - avg(rate(node_cpu_seconds_total{job="node",mode="idle"}[1m]))', "cpu")], "timeseries"),
        ("Free space on the WAL and data disk", "bytes",
         [('node_filesystem_avail_bytes{job="node",mountpoint=~"/|/var/lib/quiver"}', "{{mountpoint}}")], "timeseries"),
        ("Disk write latency", "s",
         [('rate(node_disk_write_time_seconds_total{job="node"}[1m]) / rate(node_disk_writes_completed_total{job="node"}[1m])', "{{device}}")], "timeseries"),
        ("Network in and out", "Bps",
         [('sum(rate(node_network_receive_bytes_total{job="node",device!="lo"}[1m]))', "in"),
          ('sum(rate(node_network_transmit_bytes_total{job="node",device!="lo"}[1m]))', "out")], "timeseries"),
        ("Up", "short",
         [('up{job="quiver"}', "{{instance}}")], "stat"),
    ]),
}


def panel(i, title, unit, targets, kind):
    width = 12
    return {
        "id": i + 1,
        "type": kind,
        "title": title,
        "datasource": DS,
        "gridPos": {"h": 8, "w": width, "x": (i % 2) * width, "y": (i // 2) * 8},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}} if kind == "timeseries" else {},
        "targets": [
            {"refId": chr(ord("A") + j), "datasource": DS, "expr": expr, "legendFormat": legend}
            for j, (expr, legend) in enumerate(targets)
        ],
    }


def dashboard(uid, title, panels):
    return {
        "uid": f"quiver-{uid}",
        "title": title,
        "tags": ["quiver"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "editable": True,
        "links": [{"type": "dashboards", "tags": ["quiver"], "asDropdown": True, "title": "Quiver"}],
        "panels": [panel(i, *p) for i, p in enumerate(panels)],
    }


def render():
    return {
        f"{uid}.json": json.dumps(dashboard(uid, title, panels), indent=2) + "\n"
        for uid, (title, panels) in DASHBOARDS.items()
    }


if __name__ == "__main__":
    for name, text in render().items():
        (HERE / "dashboards" / name).write_text(text)
