//! Library side of xtask: the lab harness shared by `cargo xtask demo`, `cargo xtask bench` and
//! the real-kernel integration tests in `observer/tests/`.

pub mod harness;
pub mod kube;
