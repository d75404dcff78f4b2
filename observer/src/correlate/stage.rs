//! The correlation stage: kernel events and interface changes in, record batches out. It reads
//! the flow map on its own clock (every `--poll-interval`), so that reading a key's counters and
//! deleting a finished key happen in one order: a key is never read again after its final record.

use std::{sync::Arc, time::Duration};

use log::warn;
use observer_common::{FlowKey, Point, STATS_LEN, Stat};
use tokio::{
    sync::{mpsc, oneshot, watch},
    time::{MissedTickBehavior, interval},
};

use super::{Correlator, Flush, tuple::proto_name};
use crate::{
    clock::Clock,
    export::metrics::Metrics,
    hooks::follow::Interfaces,
    readers::{FlowSource, KernelEvent, take_ended},
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
        self.settle_reuse(&mut entries);
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

    /// A reused 4-tuple: the kernel moves the old connection's counters to a retired key and
    /// starts the live key again. The walk goes bucket by bucket, so it may have seen the move
    /// half: complete `entries` as a read at one instant would have them.
    fn settle_reuse(&self, entries: &mut Vec<(FlowKey, super::Counters)>) {
        let live = |k: &FlowKey| FlowKey { retired: 0, ..*k };
        let mut twins: super::HashSet<FlowKey> = entries
            .iter()
            .filter(|(k, _)| k.retired != 0)
            .map(|(k, _)| live(k))
            .collect();
        // It may have passed the retired key's bucket before the move and the live one after
        // it (the old counters nowhere): look up the retired keys of a live key that started
        // again. Unread, the old connection would lack this key's leg in a record built now.
        let restarted: Vec<FlowKey> = entries
            .iter()
            .filter(|(k, c)| !twins.contains(k) && self.corr.restarted(k, c))
            .map(|(k, _)| *k)
            .collect();
        for k in restarted {
            let slots = 1..=observer_common::RETIRED_SLOTS;
            for t in slots.map(|retired| FlowKey { retired, ..k }) {
                if let Some(c) = self.source.counters(&t) {
                    entries.push((t, c));
                    twins.insert(k);
                }
            }
        }
        // Or it may have read the live key before the move and the retired one after it (the
        // old counters twice): read each live twin again now, after its retired key, as a read
        // key by key did.
        if !twins.is_empty() {
            entries.retain(|(k, _)| !twins.contains(k));
            entries.extend(
                twins
                    .into_iter()
                    .filter_map(|k| Some((k, self.source.counters(&k)?))),
            );
        }
    }

    fn collect(&mut self, flush: Flush) -> Vec<FlowRecord> {
        let out = self.corr.collect(Clock::mono_now(), flush);
        let m = &self.metrics;
        m.correlation_ambiguous.inc_by(out.ambiguous);
        let (races, refused) = (out.reuse_races, std::mem::take(&mut self.corr.refused));
        let by_label = [
            (&m.reuse_races, "restored", races.restored),
            (&m.reuse_races, "start_lost", races.start_lost),
            (&m.pending_refused, "socket", refused.sockets),
            (&m.pending_refused, "drop", refused.drops),
        ];
        for (metric, label, n) in by_label {
            metric.with_label_values(&[label]).inc_by(n);
        }
        m.socket_events_unmatched.inc_by(out.sockets_unmatched);
        self.remove_finished(out.finished);
        out.records
    }

    /// Take the finished live keys one by one, putting back any the kernel restarted for a new
    /// connection since they were read; delete the rest (retired twins, which the kernel no
    /// longer writes) in batches.
    fn remove_finished(&mut self, finished: Vec<FlowKey>) {
        // Only live keys have recorded counters (Correlator::recorded).
        let (mut ended, mut rest) = (Vec::new(), Vec::new());
        for k in finished {
            match self.corr.recorded(&k) {
                Some(c) => ended.push((k, c)),
                None => rest.push(k),
            }
        }
        let taken = take_ended(&mut self.source, &ended);
        self.corr.restored(&taken.restored);
        let m = &self.metrics;
        m.packets_after_final.inc_by(taken.late_packets);
        m.map_delete_errors
            .inc_by(taken.errors + self.source.remove_all(&rest));
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
    use observer_common::{IPPROTO_UDP, Point};

    use super::*;
    use crate::correlate::{
        Counters,
        tests::{MS, correlator, counters, key, socket_event},
    };

    /// A flow map held in memory; what the stage removed stays visible to the test.
    #[derive(Clone, Default)]
    struct FakeFlows {
        map: Arc<Mutex<HashMap<FlowKey, Counters>>>,
        stats: [u64; STATS_LEN as usize],
        /// Keys whose port a client reuses just before the agent takes them: the counters of
        /// the new connection's first packets.
        reused_before_take: HashMap<FlowKey, Counters>,
        /// Keys the kernel counts more packets to just before the agent takes them.
        late_before_take: HashMap<FlowKey, u64>,
        /// Keys the next walk of the map passes by (their bucket walked before they came).
        missed_by_walk: Arc<Mutex<std::collections::HashSet<FlowKey>>>,
    }

    /// What the kernel does when a SYN reuses `key`'s 4-tuple after its connection ended
    /// (observer-ebpf/src/reuse.rs): the old counters go under a retired twin, the key starts
    /// again from the SYN.
    fn reuse_port(map: &mut HashMap<FlowKey, Counters>, key: FlowKey, syn: Counters) {
        let old = map.insert(key, syn).expect("the key to reuse");
        map.insert(FlowKey { retired: 1, ..key }, old);
    }

    impl FlowSource for FakeFlows {
        type Taken = Counters;

        fn take(&mut self, key: &FlowKey) -> Result<Option<(Counters, Counters)>, MapError> {
            let mut map = self.map.lock().unwrap();
            if let Some(syn) = self.reused_before_take.remove(key) {
                reuse_port(&mut map, *key, syn);
            }
            if let (Some(n), Some(c)) = (self.late_before_take.remove(key), map.get_mut(key)) {
                c.packets += n;
            }
            Ok(map.remove(key).map(|c| (c, c)))
        }
        fn put_back(&mut self, key: &FlowKey, c: Counters) -> Result<bool, MapError> {
            let mut map = self.map.lock().unwrap();
            if map.contains_key(key) {
                return Ok(false);
            }
            map.insert(*key, c);
            Ok(true)
        }
        fn keys(&self) -> Vec<FlowKey> {
            let missed = std::mem::take(&mut *self.missed_by_walk.lock().unwrap());
            let map = self.map.lock().unwrap();
            map.keys()
                .filter(|k| !missed.contains(k))
                .copied()
                .collect()
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
    /// kernel having counted two lost socket events.
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
        flows.stats[Stat::SocketEventsLost as usize] = 2;
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

        // The socket that sent it (pid 4242).
        let mut ev = socket_event(IPPROTO_UDP, 5000, 53);
        ev.src = pre.src;
        ev.dst = pre.dst;
        ev.asked_dst = pre.dst;
        events_tx.send(KernelEvent::Socket(ev)).await.unwrap();
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
        assert_eq!(r.socket.as_ref().map(|s| s.pid), Some(4242), "{r:#?}");
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
            metrics.kernel_stat(Stat::SocketEventsLost).get(),
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

    /// A closed connection pod-a:40000 -> 100.64.0.10:443 (DNAT-ed to 10.244.2.10:8443) as
    /// node-a's kernel counted it, ended a few seconds before `now`: its four keys.
    fn closed_tcp(flows: &FakeFlows, now: u64) -> [FlowKey; 4] {
        let tcp = observer_common::IPPROTO_TCP;
        let all = observer_common::TCP_SYN | observer_common::TCP_ACK | observer_common::TCP_FIN;
        let (pod, vip, backend) = ("10.244.1.10", "100.64.0.10", "10.244.2.10");
        let keys = [
            key(tcp, pod, 40000, vip, 443, Point::PodIngress, 3),
            key(tcp, pod, 40000, backend, 8443, Point::UplinkEgress, 2),
            key(tcp, backend, 8443, pod, 40000, Point::UplinkIngress, 2),
            key(tcp, vip, 443, pod, 40000, Point::PodEgress, 3),
        ];
        let t0 = now - 5_000 * MS;
        let mut map = flows.map.lock().unwrap();
        for (i, k) in keys.iter().enumerate() {
            let marks = if i < 2 {
                observer_common::MARK_SYN_ONLY
            } else {
                0
            };
            map.insert(*k, counters(t0 + i as u64, t0 + 10 * MS, all, marks));
        }
        keys
    }

    /// A new connection's first SYN, counted at `first`.
    fn syn(first: u64) -> Counters {
        Counters {
            packets: 1,
            bytes: 74,
            first_ns: first,
            last_ns: first,
            tcp_flags: observer_common::TCP_SYN,
            marks: observer_common::MARK_SYN_ONLY,
            ..Default::default()
        }
    }

    fn stage_over(flows: &FakeFlows) -> (Stage<FakeFlows>, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new("node-a"));
        let poll = Duration::from_millis(20);
        let stage = Stage::new(correlator(), flows.clone(), metrics.clone(), poll);
        (stage, metrics)
    }

    fn races(m: &Metrics, outcome: &str) -> u64 {
        m.reuse_races.with_label_values(&[outcome]).get()
    }

    /// The client reuses its port after the poll read the old connection as ended and before
    /// the stage removed its keys. The removal finds the new connection's SYN in the live key
    /// and puts it back; the old connection, set aside by the kernel, is recorded once; the new
    /// one's record has its SYN and says nothing is missing.
    #[test]
    fn a_port_reused_before_the_removal_keeps_the_next_connections_start() {
        let now = Clock::mono_now();
        let mut flows = FakeFlows::default();
        let [pre, post, ..] = closed_tcp(&flows, now);
        flows.reused_before_take = [(pre, syn(now)), (post, syn(now + 1000))].into();
        let (mut stage, metrics) = stage_over(&flows);

        let first = stage.poll(Flush::Due);
        assert_eq!(first.len(), 1, "{first:#?}");
        let t = &first[0].totals;
        assert!(first[0].is_final);
        assert_eq!((t.packets, t.reply_packets), (5, 5));
        {
            let map = flows.map.lock().unwrap();
            assert_eq!(map.get(&pre).map(|c| c.packets), Some(1), "put back");
            assert!(map.contains_key(&FlowKey { retired: 1, ..pre }));
        }

        let next = stage.poll(Flush::All);
        assert_eq!(next.len(), 1, "the old connection once: {next:#?}");
        let r = &next[0];
        let t = &r.totals;
        assert_eq!((t.packets, t.reply_packets), (1, 0), "{r:#?}");
        assert_eq!(r.state, "syn_sent");
        assert_eq!(r.incomplete, None);
        assert_eq!(
            (races(&metrics, "restored"), races(&metrics, "start_lost")),
            (2, 0)
        );
        assert!(flows.map.lock().unwrap().is_empty(), "every key removed");
    }

    /// A retransmission counted after the read that built the final record: missing from the
    /// record, and counted.
    #[test]
    fn packets_counted_after_the_final_read_are_counted_as_such() {
        let now = Clock::mono_now();
        let mut flows = FakeFlows::default();
        let [_, post, ..] = closed_tcp(&flows, now);
        flows.late_before_take = [(post, 2)].into();
        let (mut stage, metrics) = stage_over(&flows);
        assert_eq!(stage.poll(Flush::Due).len(), 1);
        assert_eq!(metrics.packets_after_final.get(), 2);
        assert!(flows.map.lock().unwrap().is_empty());
        assert_eq!(
            races(&metrics, "restored") + races(&metrics, "start_lost"),
            0
        );
    }

    /// The walk of the map passes the retired key's bucket before the kernel moves the ended
    /// connection there and the live key's after (it then holds the next connection): the old
    /// connection is still recorded once, whole, both DNAT legs joined.
    #[test]
    fn a_walk_that_misses_a_reuse_half_way_still_records_the_connection_whole() {
        let now = Clock::mono_now();
        let flows = FakeFlows::default();
        // Ended 900 ms ago: within the 1 s linger at the first poll, past it at the second.
        let keys = closed_tcp(&flows, now + 4_090 * MS);
        let (mut stage, metrics) = stage_over(&flows);
        assert!(stage.poll(Flush::Due).is_empty(), "lingering");

        {
            let mut map = flows.map.lock().unwrap();
            for k in &keys[..2] {
                reuse_port(&mut map, *k, syn(now));
            }
        }
        // The pre-DNAT leg's retired key is missed, the post-DNAT one's seen.
        let hidden = FlowKey {
            retired: 1,
            ..keys[0]
        };
        flows.missed_by_walk.lock().unwrap().insert(hidden);
        std::thread::sleep(Duration::from_millis(150));
        let out = stage.poll(Flush::Due);
        assert_eq!(out.len(), 1, "{out:#?}");
        let r = &out[0];
        assert!(r.is_final && r.translated, "{r:#?}");
        assert_eq!((r.totals.packets, r.totals.reply_packets), (5, 5));
        assert_eq!(
            races(&metrics, "restored") + races(&metrics, "start_lost"),
            0,
            "no removal raced a reuse here"
        );
        let out = stage.poll(Flush::All);
        assert!(
            out.iter().all(|r| r.totals.packets == 1),
            "the next connection only: {out:#?}"
        );
    }
}
