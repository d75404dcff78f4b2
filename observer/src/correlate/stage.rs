//! The correlation stage: kernel events and interface changes in, record batches out. It reads
//! the flow map on its own clock (every `--poll-interval`), so that reading a key's counters and
//! deleting a finished key happen in one order: a key is never read again after its final record.

use std::{sync::Arc, time::Duration};

use log::{debug, warn};
use observer_common::{FLOW_EVENT_NEW, FlowKey, Point, STATS_LEN, Stat};
use tokio::{
    sync::{mpsc, oneshot, watch},
    time::{MissedTickBehavior, interval},
};

use super::{Correlator, Flush, tuple::proto_name};
use crate::{
    clock::Clock,
    export::metrics::Metrics,
    hooks::follow::Interfaces,
    readers::{FlowSource, KernelEvent},
    record::FlowRecord,
};

pub struct Stage<S: FlowSource> {
    pub corr: Correlator,
    pub source: S,
    pub metrics: Arc<Metrics>,
    pub poll_every: Duration,
    stats: [u64; STATS_LEN as usize],
    /// When the kernel's STATS were last read.
    last_poll_ns: u64,
}

/// The stage's inputs and output.
pub struct Wires {
    pub events: mpsc::Receiver<KernelEvent>,
    pub ifaces: watch::Receiver<Interfaces>,
    pub out: mpsc::Sender<Vec<FlowRecord>>,
    /// How to end: sent once by the agent when it stops.
    /// How to flush, and when detaching began (monotonic ns): where the next agent's gap starts.
    pub stop: oneshot::Receiver<(Flush, u64)>,
}

impl<S: FlowSource> Stage<S> {
    pub fn new(corr: Correlator, source: S, metrics: Arc<Metrics>, poll_every: Duration) -> Self {
        Stage {
            corr,
            source,
            metrics,
            poll_every,
            stats: [0; STATS_LEN as usize],
            last_poll_ns: Clock::mono_now(),
        }
    }

    /// Take what a previous agent left in a pinned map as the start of its flows: counted in
    /// records, not again in the packet metrics. Call before anything is attached.
    pub fn adopt(&mut self) -> (u64, Option<u64>) {
        let stopped = self.source.take_stop_mark();
        let mut n = 0;
        for (key, c) in self.source.entries() {
            if key.point == observer_common::STOP_MARK_POINT {
                continue;
            }
            self.corr.observe(key, c);
            n += 1;
        }
        self.metrics.flows_adopted.inc_by(n);
        (n, stopped)
    }

    /// The adopted flows went uncounted from the previous agent's orderly stop (the time it left
    /// in the map) or, after a crash, from the last packet it counted, until `attached_ns`.
    pub fn mark_gap(&mut self, stopped_ns: Option<u64>, attached_ns: u64) {
        let (from, how) = match stopped_ns {
            Some(ns) => (ns, "stopped"),
            None => (self.corr.last_counted_ns(), "crashed"),
        };
        self.corr.mark_gap(from, attached_ns, how);
    }

    pub fn set_interfaces(&mut self, i: &Interfaces) {
        for (idx, name) in &i.names {
            self.corr.set_ifname(*idx, name);
        }
        self.corr.set_local_pods(i.local_pods.iter().copied());
    }

    fn on_event(&mut self, ev: KernelEvent) {
        let now = Clock::mono_now();
        match ev {
            KernelEvent::Flow(f) => {
                if f.kind == FLOW_EVENT_NEW {
                    debug!("new flow key {:?}", f.key);
                }
            }
            KernelEvent::Socket(s) => self.corr.add_socket(&s, now),
            KernelEvent::Drop {
                ev,
                reason,
                location,
            } => self.corr.add_drop(&ev, reason, location, now),
            KernelEvent::DropRule { target, rule } => {
                self.metrics
                    .drop_rule_traces
                    .with_label_values(&["named"])
                    .inc();
                self.corr.add_drop_rule(target, rule, now);
            }
        }
    }

    /// Read the kernel's counters and STATS, and build the records `flush` asks for.
    pub fn poll(&mut self, flush: Flush) -> Vec<FlowRecord> {
        let full_before = self.stats[Stat::FlowMapFull as usize];
        self.read_stats();
        let now = Clock::mono_now();
        if self.stats[Stat::FlowMapFull as usize] != full_before {
            // Some key of a connection active in this interval may be missing from its record.
            self.corr.note_map_full(self.last_poll_ns, now);
        }
        self.last_poll_ns = now;
        self.read_counters();
        self.collect(flush)
    }

    fn read_stats(&mut self) {
        let now = self.source.stats();
        for s in Stat::ALL {
            let delta = now[s as usize].saturating_sub(self.stats[s as usize]);
            if delta > 0 {
                self.metrics.kernel_stat(s).inc_by(delta);
            }
        }
        self.stats = now;
    }

    fn read_counters(&mut self) {
        // The whole map in a few syscalls: announced keys, the filter table's unannounced
        // "passed" twins and keys whose event was lost alike.
        let mut entries = self.source.entries();
        // A reused 4-tuple: the kernel moves the old connection's counters to a retired key
        // and starts the live key again. The walk goes bucket by bucket, so it may have read
        // the live key before the move and the retired one after it (the old counters twice):
        // read each live twin again now, after its retired key, as a read key by key did.
        let twins: super::HashSet<FlowKey> = entries
            .iter()
            .filter(|(k, _)| k.retired != 0)
            .map(|(k, _)| FlowKey { retired: 0, ..*k })
            .collect();
        if !twins.is_empty() {
            entries.retain(|(k, _)| !twins.contains(k));
            entries.extend(
                twins
                    .into_iter()
                    .filter_map(|k| Some((k, self.source.counters(&k)?))),
            );
        }
        // Retired keys first, oldest first: each takes over what was read of its live twin
        // (Correlator::observe).
        entries.sort_unstable_by_key(|(k, c)| {
            (k.retired == 0, if k.retired != 0 { c.first_ns } else { 0 })
        });
        // Summed per label set first: one metric lookup per point and protocol, not per key.
        let mut added: super::HashMap<(Point, u8), super::Delta> = Default::default();
        for (key, c) in entries {
            if let Some((point, d)) = self.corr.observe(key, c) {
                let sum = added.entry((point, key.proto)).or_default();
                sum.packets += d.packets;
                sum.bytes += d.bytes;
            }
        }
        for ((point, proto), d) in added {
            let labels = [point.as_str(), &proto_name(proto)];
            self.metrics
                .packets
                .with_label_values(&labels)
                .inc_by(d.packets);
            self.metrics
                .bytes
                .with_label_values(&labels)
                .inc_by(d.bytes);
        }
        for key in self.corr.wants_ct() {
            let ct = self.source.ct_orig(&key);
            self.corr.set_ct(&key, ct);
        }
        self.metrics
            .observations_active
            .set(self.corr.active() as i64);
    }

    fn collect(&mut self, flush: Flush) -> Vec<FlowRecord> {
        let out = self.corr.collect(Clock::mono_now(), flush);
        let m = &self.metrics;
        m.correlation_ambiguous.inc_by(out.ambiguous);
        m.reuse_races.inc_by(out.reuse_races);
        let refused = std::mem::take(&mut self.corr.refused);
        m.pending_refused
            .with_label_values(&["socket"])
            .inc_by(refused.sockets);
        m.pending_refused
            .with_label_values(&["drop"])
            .inc_by(refused.drops);
        m.socket_events_unmatched.inc_by(out.sockets_unmatched);
        m.map_delete_errors
            .inc_by(self.source.remove_all(&out.finished));
        out.records
    }

    /// Run until told to stop; then take the events already delivered, read the map once more,
    /// send the last records as `stop` asks, and return (which closes `out`).
    pub async fn run(mut self, mut w: Wires) {
        let mut poll = interval(self.poll_every);
        poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let (flush, detached_ns) = loop {
            tokio::select! {
                stop = &mut w.stop => break stop.unwrap_or((Flush::All, Clock::mono_now())),
                Some(ev) = w.events.recv() => self.on_event(ev),
                Ok(()) = w.ifaces.changed() => {
                    let i = w.ifaces.borrow_and_update().clone();
                    self.set_interfaces(&i);
                }
                _ = poll.tick() => {
                    let batch = self.poll(Flush::Due);
                    self.hand_over(&w.out, batch).await;
                }
            }
        };
        while let Ok(ev) = w.events.try_recv() {
            self.on_event(ev);
        }
        let batch = self.poll(flush);
        if flush == Flush::Checkpoint {
            // The programs were detached from `detached_ns` on (the pipeline stops them first):
            // from then nothing counts until the next agent attaches.
            self.source.put_stop_mark(detached_ns);
        }
        self.hand_over(&w.out, batch).await;
    }

    /// Send a batch to the exporters; if they are gone, its records are counted as lost.
    async fn hand_over(&self, out: &mpsc::Sender<Vec<FlowRecord>>, batch: Vec<FlowRecord>) {
        let n = batch.len() as u64;
        if n > 0 && out.send(batch).await.is_err() {
            warn!("the exporters are gone: {n} records lost");
            self.metrics
                .records_lost
                .with_label_values(&["exporter_gone"])
                .inc_by(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashMap,
        sync::{Arc, Mutex},
    };

    use aya::maps::MapError;
    use observer_common::{FLOW_EVENT_NEW, FlowEvent, IPPROTO_UDP, Point};

    use super::*;
    use crate::correlate::{
        Counters,
        tests::{MS, correlator, counters, key},
    };

    /// A flow map held in memory; what the stage removed stays visible to the test.
    #[derive(Clone, Default)]
    struct FakeFlows {
        map: Arc<Mutex<HashMap<FlowKey, Counters>>>,
        stats: [u64; STATS_LEN as usize],
    }

    impl FlowSource for FakeFlows {
        fn keys(&self) -> Vec<FlowKey> {
            self.map.lock().unwrap().keys().copied().collect()
        }
        fn counters(&self, key: &FlowKey) -> Option<Counters> {
            self.map.lock().unwrap().get(key).copied()
        }
        fn remove(&mut self, key: &FlowKey) -> Result<(), MapError> {
            self.map.lock().unwrap().remove(key);
            Ok(())
        }
        fn stats(&self) -> [u64; STATS_LEN as usize] {
            self.stats
        }
    }

    /// A UDP exchange pod-a -> 100.64.0.53:53, DNAT-ed to 10.244.2.53:5353, in the map; and the
    /// kernel having counted two lost flow events.
    fn dnat_udp_exchange(t0: u64) -> (FakeFlows, FlowKey) {
        let udp = IPPROTO_UDP;
        let pre = key(
            udp,
            "10.244.1.10",
            5000,
            "100.64.0.53",
            53,
            Point::PodIngress,
            3,
        );
        let post = key(
            udp,
            "10.244.1.10",
            5000,
            "10.244.2.53",
            5353,
            Point::UplinkEgress,
            2,
        );
        let mut flows = FakeFlows::default();
        flows.stats[Stat::FlowEventsLost as usize] = 2;
        for k in [pre, post] {
            flows
                .map
                .lock()
                .unwrap()
                .insert(k, counters(t0, t0 + MS, 0, 0));
        }
        (flows, pre)
    }

    #[tokio::test]
    async fn events_in_records_out_and_stop_writes_what_is_open() {
        let t0 = Clock::mono_now();
        let (flows, pre) = dnat_udp_exchange(t0);
        let metrics = Arc::new(Metrics::new("node-a"));
        let stage = Stage::new(
            correlator(),
            flows.clone(),
            metrics.clone(),
            Duration::from_millis(20),
        );
        let (events_tx, events) = mpsc::channel(16);
        let (ifaces_tx, ifaces) = watch::channel(Interfaces::default());
        let (out, mut batches) = mpsc::channel(4);
        let (stop_tx, stop) = oneshot::channel();
        let task = tokio::spawn(stage.run(Wires {
            events,
            ifaces,
            out,
            stop,
        }));

        let ev = FlowEvent {
            key: pre,
            kind: FLOW_EVENT_NEW,
            tcp_flags: 0,
            _pad: [0; 2],
            ts_ns: t0,
        };
        events_tx.send(KernelEvent::Flow(ev)).await.unwrap();
        ifaces_tx.send_replace(Interfaces {
            names: [(3, "vethpoda".to_owned()), (2, "eth0".to_owned())].into(),
            local_pods: ["10.244.1.10".parse().unwrap()].into(),
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            batches.try_recv().is_err(),
            "an active UDP exchange has no record before its idle timeout"
        );

        stop_tx.send((Flush::All, Clock::mono_now())).unwrap();
        let batch = batches.recv().await.expect("the last batch");
        assert_eq!(batch.len(), 1, "{batch:#?}");
        let r = &batch[0];
        assert!(r.is_final && r.translated);
        assert_eq!(r.pre_dnat.as_ref().unwrap().dport, 53);
        assert_eq!(r.post_dnat.as_ref().unwrap().dport, 5353);
        assert!(
            r.hops
                .iter()
                .any(|h| h.iface.as_deref() == Some("vethpoda")),
            "{:?}",
            r.hops
        );
        task.await.unwrap();
        assert!(
            batches.recv().await.is_none(),
            "the stage closes its output"
        );
        assert!(
            flows.map.lock().unwrap().is_empty(),
            "finished keys are removed from the map"
        );
        assert_eq!(
            metrics.kernel_stat(Stat::FlowEventsLost).get(),
            2,
            "the kernel's STATS reach the metrics"
        );
        assert_eq!(
            metrics
                .packets
                .with_label_values(&["pod_ingress", "UDP"])
                .get(),
            5
        );
    }

    /// A poll reads the whole map: keys the kernel never announces (what came out of the filter
    /// table) and keys whose announcement was lost alike.
    #[test]
    fn every_key_in_the_map_is_read_announced_or_not() {
        let tcp = observer_common::IPPROTO_TCP;
        let t = ("10.244.1.10", 40000, "10.244.2.10", 8443);
        let before = key(tcp, t.0, t.1, t.2, t.3, Point::FilterForward, 3);
        let passed = key(tcp, t.0, t.1, t.2, t.3, Point::FilterForwardPassed, 3);
        let flows = FakeFlows::default();
        for k in [before, passed] {
            flows
                .map
                .lock()
                .unwrap()
                .insert(k, counters(MS, 2 * MS, 0, 0));
        }
        let metrics = Arc::new(Metrics::new("node-a"));
        let mut stage = Stage::new(correlator(), flows, metrics, Duration::from_millis(20));
        stage.read_counters();
        let known: std::collections::HashSet<FlowKey> = stage.corr.known_keys().copied().collect();
        assert!(
            known.contains(&before) && known.contains(&passed),
            "{known:?}"
        );
    }
}
