//! cgroup hooks: what the application asked for, and which process asked.
//!
//! `connect.rs` remembers, per socket, the destination passed to connect()/sendmsg() with the
//! process; `egress.rs` joins that with the socket's first real packet (which carries the source
//! port the kernel picked) and reports it once. Attached to the cgroup v2 root in multi-program
//! mode; they never alter or refuse anything.

mod connect;
mod egress;
