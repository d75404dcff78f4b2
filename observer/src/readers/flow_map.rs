//! The flow map and the kernel's STATS, read on correlation's clock. Behind [`FlowSource`], so
//! correlation can be driven by synthetic counters in tests.

use std::os::fd::AsFd as _;

use aya::maps::{
    HashMap, IterableMap as _, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues,
};
use observer_common::{CtOrig, FlowCounters, FlowKey, Point, STATS_LEN, Stat};

use super::batch::{self, LookupBuf};
use crate::correlate::Counters;

/// Where correlation reads counters from.
pub trait FlowSource: Send + 'static {
    /// Every key in the map.
    fn keys(&self) -> Vec<FlowKey>;
    /// The key's cumulative counters over all CPUs; `None` if the key is gone.
    fn counters(&self, key: &FlowKey) -> Option<Counters>;
    /// Forget a finished key; a key already gone is no error.
    fn remove(&mut self, key: &FlowKey) -> Result<(), MapError>;
    /// The kernel's cumulative STATS over all CPUs, by [`Stat`].
    fn stats(&self) -> [u64; STATS_LEN as usize];
    /// Conntrack's original tuple as the kernel saw it when `key` was created (egress points).
    fn ct_orig(&self, _key: &FlowKey) -> Option<CtOrig> {
        None
    }
    /// Leave the time of an orderly stop in the map ([`observer_common::STOP_MARK_POINT`]).
    fn put_stop_mark(&mut self, _mono_ns: u64) {}
    /// Take out the time of the previous agent's orderly stop, if it left one.
    fn take_stop_mark(&mut self) -> Option<u64> {
        None
    }
    /// Every entry with its counters: what a poll reads, and what an agent adopts from a
    /// pinned map.
    fn entries(&mut self) -> Vec<(FlowKey, Counters)> {
        entries_key_by_key(self)
    }
    /// Forget finished keys; returns how many could not be removed (keys already gone are no
    /// error).
    fn remove_all(&mut self, keys: &[FlowKey]) -> u64 {
        remove_key_by_key(self, keys)
    }
}

/// [`FlowSource::entries`] with one lookup per key.
fn entries_key_by_key<S: FlowSource + ?Sized>(s: &S) -> Vec<(FlowKey, Counters)> {
    s.keys()
        .into_iter()
        .filter_map(|k| Some((k, s.counters(&k)?)))
        .collect()
}

/// [`FlowSource::remove_all`] with one delete per key.
fn remove_key_by_key<S: FlowSource + ?Sized>(s: &mut S, keys: &[FlowKey]) -> u64 {
    keys.iter().filter(|k| s.remove(k).is_err()).count() as u64
}

/// The kernel's FLOWS and STATS maps.
pub struct KernelFlows {
    flows: PerCpuHashMap<MapData, FlowKey, FlowCounters>,
    stats: PerCpuArray<MapData, u64>,
    ct_orig: HashMap<MapData, FlowKey, CtOrig>,
    /// Possible CPUs: the number of values of a per-CPU entry.
    cpus: usize,
    buf: LookupBuf<FlowKey, FlowCounters>,
    /// Batch operations work on this kernel (until one fails with something else than a
    /// missing key: then one syscall per key, as before Linux 5.6).
    batch: bool,
}

impl KernelFlows {
    pub fn new(
        flows: PerCpuHashMap<MapData, FlowKey, FlowCounters>,
        stats: PerCpuArray<MapData, u64>,
        ct_orig: HashMap<MapData, FlowKey, CtOrig>,
    ) -> Self {
        KernelFlows {
            flows,
            stats,
            ct_orig,
            cpus: aya::util::nr_cpus().unwrap_or(1),
            buf: LookupBuf::new(),
            batch: true,
        }
    }

    fn no_batch(&mut self, what: &str, e: std::io::Error) {
        log::warn!("{what} of the flow map in batches failed ({e}): one key at a time from now on");
        self.batch = false;
    }
}

impl FlowSource for KernelFlows {
    fn entries(&mut self) -> Vec<(FlowKey, Counters)> {
        if self.batch {
            let fd = self.flows.map().fd().as_fd();
            match self.buf.lookup_all(fd, self.cpus) {
                Ok((keys, values)) => {
                    return keys
                        .iter()
                        .zip(values.chunks_exact(self.cpus))
                        .map(|(k, v)| (*k, sum(v)))
                        .collect();
                }
                Err(e) => self.no_batch("reading", e),
            }
        }
        entries_key_by_key(self)
    }

    fn remove_all(&mut self, keys: &[FlowKey]) -> u64 {
        if self.batch {
            // Only the egress points note a conntrack tuple.
            let noted: Vec<FlowKey> = keys
                .iter()
                .filter(|k| Point::from_u8(k.point).is_some_and(Point::notes_ct))
                .copied()
                .collect();
            let res = batch::delete(self.ct_orig.map().fd().as_fd(), &noted)
                .and_then(|_| batch::delete(self.flows.map().fd().as_fd(), keys));
            match res {
                Ok(_) => return 0,
                Err(e) => self.no_batch("deleting", e),
            }
        }
        remove_key_by_key(self, keys)
    }

    fn keys(&self) -> Vec<FlowKey> {
        self.flows.keys().filter_map(Result::ok).collect()
    }

    fn counters(&self, key: &FlowKey) -> Option<Counters> {
        self.flows.get(key, 0).ok().map(|v| sum(&v))
    }

    fn remove(&mut self, key: &FlowKey) -> Result<(), MapError> {
        // Not every key has one (ingress points note none).
        let _ = self.ct_orig.remove(key);
        match self.flows.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn ct_orig(&self, key: &FlowKey) -> Option<CtOrig> {
        self.ct_orig.get(key, 0).ok()
    }

    fn put_stop_mark(&mut self, mono_ns: u64) {
        let Ok(cpus) = aya::util::nr_cpus() else {
            return;
        };
        let value = FlowCounters {
            last_ns: mono_ns,
            ..Default::default()
        };
        if let Ok(values) = PerCpuValues::try_from(vec![value; cpus])
            && let Err(e) = self.flows.insert(stop_mark(), values, 0)
        {
            log::warn!("leaving the stop time in the pinned map: {e}");
        }
    }

    fn take_stop_mark(&mut self) -> Option<u64> {
        let at = self.flows.get(&stop_mark(), 0).ok()?;
        let _ = self.flows.remove(&stop_mark());
        at.iter().map(|c| c.last_ns).max()
    }

    fn stats(&self) -> [u64; STATS_LEN as usize] {
        let mut out = [0; STATS_LEN as usize];
        for s in Stat::ALL {
            if let Ok(v) = self.stats.get(&(s as u32), 0) {
                out[s as usize] = v.iter().sum();
            }
        }
        out
    }
}

fn stop_mark() -> FlowKey {
    FlowKey {
        src: [0; 16],
        dst: [0; 16],
        sport: 0,
        dport: 0,
        ifindex: 0,
        proto: 0,
        family: 0,
        point: observer_common::STOP_MARK_POINT,
        retired: 0,
    }
}

/// One key's per-CPU counters as one: sums, the earliest first and latest last time, all flags.
pub fn sum(values: &[FlowCounters]) -> Counters {
    let mut c = Counters::default();
    for v in values {
        c.merge(v);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_cpu_counters_add_up_and_keep_the_outer_times() {
        let cpu = |packets, first_ns, last_ns, tcp_flags| FlowCounters {
            packets,
            bytes: packets * 100,
            first_ns,
            last_ns,
            tcp_flags,
            ..Default::default()
        };
        // CPU 1 never saw the flow (first_ns 0) and must not make the start 0.
        let c = sum(&[
            cpu(3, 200, 900, 0x02),
            cpu(0, 0, 0, 0),
            cpu(2, 100, 500, 0x10),
        ]);
        assert_eq!((c.packets, c.bytes), (5, 500));
        assert_eq!((c.first_ns, c.last_ns), (100, 900));
        assert_eq!(c.tcp_flags, 0x12);
    }
}
