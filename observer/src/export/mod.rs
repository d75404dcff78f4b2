//! Exporters: JSON flow log and Prometheus metrics (served over HTTP with health probes).

pub mod http;
pub mod json;
pub mod metrics;
