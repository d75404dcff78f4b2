//! Exporters, the pipeline's last stage (`stage`): JSON flow log, Prometheus metrics, OTLP logs
//! (`otlp`), and the
//! HTTP endpoints (/metrics, /healthz, /readyz, /flows; `recent` keeps what /flows serves).

pub mod flows_auth;
pub mod http;
pub mod json;
pub mod metrics;
pub mod otlp;
pub mod recent;
pub mod stage;
