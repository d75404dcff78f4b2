//! Tracepoints.

mod drop;
