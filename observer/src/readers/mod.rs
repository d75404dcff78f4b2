//! Kernel readers, the pipeline's first stage after the hooks: the ring buffers (what the flow
//! map cannot say: the process behind a socket, a drop) and the flow map (the counters
//! themselves, read by correlation through [`FlowSource`], the whole map every poll in a few
//! batch calls: `batch.rs`; no event announces a new key).
//!
//! The ring reader hands events on through a bounded channel and waits when correlation is
//! behind; the kernel then finds its ring full and counts what it could not deliver (STATS), so
//! nothing is lost without a count.

mod batch;
mod decode;
mod flow_map;
pub mod rule_trace;
mod take;

use std::{collections::HashMap, io, sync::Arc};

use aya::maps::{MapData, RingBuf};
use observer_common::{DropEvent, SocketEvent};
use tokio::{io::unix::AsyncFd, sync::mpsc};

pub use flow_map::{FlowSource, KernelFlows, take_ended};

use crate::{export::metrics::Metrics, hooks::drop::Kallsyms};

/// One decoded ring-buffer record, with what userspace adds to it.
#[derive(Debug)]
pub enum KernelEvent {
    Socket(SocketEvent),
    Drop {
        ev: DropEvent,
        /// The kernel's `enum skb_drop_reason` name, or its number.
        reason: String,
        /// `function+offset` of the dropping code.
        location: String,
    },
    /// The netfilter rule that drops packets of `target`, from the kernel's trace.
    DropRule {
        target: rule_trace::Target,
        rule: crate::record::DropRule,
    },
}

/// The two ring buffers, registered with the runtime.
pub struct Rings {
    socket: AsyncFd<RingBuf<MapData>>,
    drop: AsyncFd<RingBuf<MapData>>,
}

impl Rings {
    pub fn register(socket: RingBuf<MapData>, drop: RingBuf<MapData>) -> io::Result<Rings> {
        Ok(Rings {
            socket: watch(socket)?,
            drop: watch(drop)?,
        })
    }
}

fn watch(rb: RingBuf<MapData>) -> io::Result<AsyncFd<RingBuf<MapData>>> {
    // SAFETY: the ring buffer owns its fd and keeps it open for as long as the AsyncFd lives.
    unsafe { AsyncFd::register(rb) }.map_err(|e| e.into_parts().1)
}

/// Names drop reasons and locations (from the kernel's BTF and kallsyms), and asks the kernel's
/// trace for the rule of a netfilter drop when `--trace-drop-rules` is on.
pub struct DropNamer {
    pub reasons: HashMap<i64, String>,
    pub kallsyms: Kallsyms,
    pub tracer: Option<rule_trace::RuleTracer>,
}

impl DropNamer {
    fn name(&self, ev: DropEvent) -> KernelEvent {
        KernelEvent::Drop {
            reason: self
                .reasons
                .get(&(ev.reason as i64))
                .cloned()
                .unwrap_or_else(|| ev.reason.to_string()),
            location: self.kallsyms.resolve(ev.location),
            ev,
        }
    }
}

/// Take everything the ring holds now, then let the runtime wake us for more.
async fn take<T>(
    fd: &mut AsyncFd<RingBuf<MapData>>,
    decode: impl Fn(&[u8]) -> Option<T>,
) -> io::Result<Vec<T>> {
    let mut guard = fd.readable_mut().await?;
    let mut out = Vec::new();
    let rb = guard.get_inner_mut();
    while let Some(item) = rb.next() {
        out.extend(decode(&item));
    }
    guard.clear_ready();
    Ok(out)
}

/// The ring reader stage: runs until correlation hangs up (Ok) or a ring fails (Err).
pub async fn read_rings(
    mut rings: Rings,
    names: DropNamer,
    metrics: Arc<Metrics>,
    tx: mpsc::Sender<KernelEvent>,
) -> io::Result<()> {
    loop {
        let events: Vec<KernelEvent> = tokio::select! {
            r = take(&mut rings.socket, decode::socket) => {
                let evs = r?;
                metrics.socket_events.inc_by(evs.len() as u64);
                evs.into_iter().map(KernelEvent::Socket).collect()
            }
            r = take(&mut rings.drop, decode::drop) => r?.into_iter().map(|ev| {
                let named = names.name(ev);
                if let KernelEvent::Drop { reason, ev, .. } = &named {
                    metrics.drops.with_label_values(&[reason.as_str()]).inc();
                    if let Some(t) = &names.tracer
                        && reason.starts_with("NETFILTER")
                    {
                        let outcome = if t.request(ev) { "requested" } else { "busy" };
                        metrics.drop_rule_traces.with_label_values(&[outcome]).inc();
                    }
                }
                named
            }).collect(),
            _ = tx.closed() => return Ok(()),
        };
        for ev in events {
            if tx.send(ev).await.is_err() {
                return Ok(());
            }
        }
    }
}
