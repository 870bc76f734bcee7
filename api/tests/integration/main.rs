//! End-to-end tests: the real `quiver` binary, real HTTP, real Delta tables, a real
//! S3-compatible server.

mod alerts;
mod backup;
mod bi;
mod common;
mod crash;
mod dashboard;
mod disk_full;
mod edge;
mod ingest;
mod jobs;
mod monitoring;
mod push;
mod reports;
mod s3;
mod sql;
mod tools;
mod views;
