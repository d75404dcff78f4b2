//! The flow map and the kernel's STATS, read on correlation's clock. Behind [`FlowSource`], so
//! correlation can be driven by synthetic counters in tests.

use std::os::fd::AsFd as _;

use aya::maps::{
    HashMap, IterableMap as _, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues,
};
use observer_common::{CtOrig, FlowCounters, FlowKey, Point, STATS_LEN, Stat};

use super::{
    batch::{self, LookupBuf},
    take,
};
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
    /// Remove `key` with its conntrack tuple and return what it held at that instant, with
    /// what [`FlowSource::put_back`] needs; `None` if it was gone.
    fn take(&mut self, key: &FlowKey) -> Result<Option<(Counters, Self::Taken)>, MapError>;
    /// Put back what [`FlowSource::take`] removed, unless the kernel made the key again
    /// meanwhile (`Ok(false)`).
    fn put_back(&mut self, key: &FlowKey, taken: Self::Taken) -> Result<bool, MapError>;
    /// What a take removed, as the map held it.
    type Taken;
}

/// What [`take_ended`] found in the keys it removed.
#[derive(Debug, Default, PartialEq)]
pub struct Ended {
    /// Keys the kernel had restarted for a new connection on the same 4-tuple after they were
    /// read as ended: put back, the new connection's packets in them.
    pub restored: Vec<FlowKey>,
    /// Packets counted to ended keys after the read their final record was built from.
    pub late_packets: u64,
    /// Keys that could not be removed, or not put back.
    pub errors: u64,
}

/// Remove the live keys of finished connections, each with the counters its final record was
/// built from. A key whose first packet is no longer the recorded one was restarted by a
/// client reusing its port in between (its old counters are under a retired twin): what it
/// holds now is the next connection's, and goes back.
pub fn take_ended<S: FlowSource + ?Sized>(s: &mut S, ended: &[(FlowKey, Counters)]) -> Ended {
    let mut out = Ended::default();
    for (key, recorded) in ended {
        match s.take(key) {
            Ok(None) => {}
            Ok(Some((now, _))) if now.first_ns == recorded.first_ns => {
                out.late_packets += now.packets.saturating_sub(recorded.packets);
            }
            Ok(Some((_, taken))) => match s.put_back(key, taken) {
                Ok(true) => out.restored.push(*key),
                // Made again by the new connection's next packet: its start is lost, and the
                // retired twin's read says so (Correlator::observe).
                Ok(false) => {}
                Err(_) => out.errors += 1,
            },
            Err(_) => out.errors += 1,
        }
    }
    out
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
    /// Lookup-and-delete works on this kernel (Linux 5.14); without it a take is a read and
    /// a delete, which cannot see a restart in between.
    atomic_take: bool,
}

/// What [`KernelFlows::take`] removed: every CPU's counters and the conntrack tuple.
pub struct TakenKey {
    values: Vec<FlowCounters>,
    ct: Option<CtOrig>,
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
            atomic_take: true,
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
            let noted: Vec<FlowKey> = keys.iter().filter(|k| notes_ct(k)).copied().collect();
            let res = batch::delete(self.ct_orig.map().fd().as_fd(), &noted)
                .and_then(|_| batch::delete(self.flows.map().fd().as_fd(), keys));
            match res {
                Ok(_) => return 0,
                Err(e) => self.no_batch("deleting", e),
            }
        }
        remove_key_by_key(self, keys)
    }

    type Taken = TakenKey;

    fn take(&mut self, key: &FlowKey) -> Result<Option<(Counters, TakenKey)>, MapError> {
        if self.atomic_take {
            match self.take_atomically(key) {
                // Refused by the first call (the conntrack tuple's, for an egress key) before
                // anything was removed.
                Err(e) if take::unsupported(&e) => {
                    log::warn!(
                        "lookup-and-delete of the flow map failed ({e}): finished keys are read \
                         and deleted from now on, which cannot tell a port reused in between"
                    );
                    self.atomic_take = false;
                }
                r => return r.map_err(|e| syscall_error("bpf_map_lookup_and_delete_elem", e)),
            }
        }
        let Some(values) = self.flows.get(key, 0).ok() else {
            return Ok(None);
        };
        let ct = self.ct_orig(key);
        self.remove(key)?;
        let values = values.to_vec();
        Ok(Some((sum(&values), TakenKey { values, ct })))
    }

    fn put_back(&mut self, key: &FlowKey, taken: TakenKey) -> Result<bool, MapError> {
        let values = PerCpuValues::try_from(taken.values)
            .map_err(|e| syscall_error("bpf_map_update_elem", e))?;
        match self.flows.insert(key, values, BPF_NOEXIST) {
            Ok(()) => {}
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {
                return Ok(false);
            }
            Err(e) => return Err(e),
        }
        if let Some(ct) = taken.ct {
            // Already there: the kernel noted the new connection's own after the take.
            let _ = self.ct_orig.insert(key, ct, BPF_NOEXIST);
        }
        Ok(true)
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

impl KernelFlows {
    /// [`FlowSource::take`] with `BPF_MAP_LOOKUP_AND_DELETE_ELEM` (Linux 5.14 for hash maps).
    fn take_atomically(&mut self, key: &FlowKey) -> std::io::Result<Option<(Counters, TakenKey)>> {
        // The conntrack tuple first: a restart between the two takes leaves the new
        // connection's in the map, and the put-back of the old one finds it there.
        let ct = if notes_ct(key) {
            let mut ct = [CtOrig::default()];
            let fd = self.ct_orig.map().fd().as_fd();
            take::lookup_and_delete(fd, key, &mut ct)?.then_some(ct[0])
        } else {
            None
        };
        let mut values = vec![FlowCounters::default(); self.cpus];
        let fd = self.flows.map().fd().as_fd();
        let found = take::lookup_and_delete(fd, key, &mut values)?;
        Ok(found.then(|| (sum(&values), TakenKey { values, ct })))
    }
}

/// Only the egress points note a conntrack tuple for their keys.
fn notes_ct(key: &FlowKey) -> bool {
    Point::from_u8(key.point).is_some_and(Point::notes_ct)
}

/// `BPF_NOEXIST` (include/uapi/linux/bpf.h): create only.
const BPF_NOEXIST: u64 = 1;

fn syscall_error(call: &'static str, io_error: std::io::Error) -> MapError {
    aya::sys::SyscallError { call, io_error }.into()
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
