//! The embedded lab: two Kubernetes-shaped nodes and their pods as network namespaces on one
//! machine, with kube-proxy-style DNAT, Calico-shaped NetworkPolicy and a VPC firewall, so the
//! whole story can be watched without a cluster. It is its own product (`observer-lab`); the
//! agent knows it only through the names file it writes.
//!
//! - `config` (the description) and `model` (its vocabulary) say what the lab is;
//! - `lab` builds it from namespaces and veths (`netns`), with `kubeproxy` rules, `policy`
//!   chains and the `firewall`, and writes its `names` file; `kubeproxy` writes kube-proxy's
//!   iptables mode, `kubeproxy_nft` its nftables mode; `outside` is a host beyond the VPC and
//!   the nodes' masquerade towards it; `socket_lb` loads the socket-level load balancer
//!   (`observer-lab-ebpf`) for `--lb socket`;
//! - `traffic` is the server in each backend pod and the client the tests use; `storm` the
//!   load generator of the storm bench (connections at a fixed rate, each counted);
//! - `drive` runs a lab and its agents from outside, for the demo, the benches and the tests.

pub mod cli;
pub mod command;
pub mod config;
pub mod drive;
pub mod firewall;
pub mod kubeproxy;
pub mod kubeproxy_nft;
pub mod lab;
pub mod model;
pub mod names;
pub mod netns;
pub mod otlp_receiver;
pub mod outside;
pub mod policy;
pub mod socket_lb;
pub mod storm;
pub mod traffic;

pub use lab::{Lab, LabError};
