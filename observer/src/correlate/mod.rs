//! Correlation: kernel observations + socket events -> one record per connection per node.
//!
//! The kernel aggregates per (tuple, point, interface); this module keeps the latest counters of
//! each, groups them into connections ([`conn::group`]), decides when a connection is over and
//! builds its [`FlowRecord`].

pub mod conn;
mod policy;
pub mod stage;
pub mod tuple;

/// Correlation's maps, keyed by tuples that arrive in packets: a hash seeded at random per
/// process (like std's SipHash) but about twice as fast.
pub type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
pub type HashSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

use observer_common::{
    CT_UNTRACKED, CtOrig, DropEvent, FlowKey, IPPROTO_TCP, Point, SocketEvent, TCP_FIN, TCP_RST,
    TCP_SYN,
};

use crate::{
    clock::Clock,
    readers::rule_trace::Target,
    record::{
        Direction, FlowRecord, Hop, ObservedAs, SCHEMA, SocketInfo, Totals, Translation, TupleView,
    },
};
use conn::{Conn, Leg};
pub use conn::{ConnId, Counters, Ct, Observation};

/// Polls that may find no conntrack entry for an egress key before it is taken as having none.
const CT_TRIES: u8 = 3;
use tuple::{Endpoint, Tuple, addr, proto_name, tcp_flags_string};

#[derive(Clone, Debug)]
pub struct Config {
    pub node: String,
    pub idle_timeout_ns: u64,
    /// Idle limit for TCP connections that were answered and not closed (conntrack keeps such
    /// connections for days; a quiet keep-alive connection is not over).
    pub tcp_idle_timeout_ns: u64,
    pub flush_ns: u64,
    /// After FIN both ways or RST, wait this long for the last ACKs before the final record.
    pub linger_ns: u64,
    /// Socket events that match no flow of this node are forgotten after this long (they belong
    /// to another node's pods, or to host sockets).
    pub socket_ttl_ns: u64,
    /// At most this many pending socket events and drops are kept; beyond it new ones are
    /// refused and counted, so a connection storm on other nodes cannot grow the agent.
    pub pending_max: usize,
    /// The netfilter programs around the filter table are linked: `policy_view` is what they saw.
    /// Otherwise it is derived from the tc points, and says so.
    pub filter_measured: bool,
}

#[derive(Clone, Debug)]
struct SockMeta {
    pid: u32,
    comm: String,
    cgroup_id: u64,
    asked: Endpoint,
    ts_ns: u64,
    received_ns: u64,
}

#[derive(Clone, Debug)]
struct DropSeen {
    reason: String,
    location: String,
    ifindex: u32,
    packets: u64,
    last_ns: u64,
    received_ns: u64,
}

#[derive(Clone, Copy, Debug)]
struct Emitted {
    at_ns: u64,
    packets: u64,
}

/// Which records [`Correlator::collect`] builds.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Flush {
    /// Final records for finished connections, interim ones every `flush_ns`.
    Due,
    /// As `Due`, plus an interim record for every other connection that changed since its last
    /// one: the agent stops while the kernel keeps its counters (pinned) for the next agent.
    Checkpoint,
    /// Every connection ends now: the agent stops and its counters go with it.
    All,
}

/// Full-map intervals remembered: more than enough to cover the connections open at any time
/// at the default poll interval (a minute and more of consecutive full polls).
const MAP_FULL_KEPT: usize = 256;

/// What one [`Correlator::collect`] produced.
#[derive(Default, Debug)]
pub struct Collected {
    pub records: Vec<FlowRecord>,
    /// Kernel keys of finished connections: delete them from the flow map.
    pub finished: Vec<FlowKey>,
    /// Connections whose pre/post pairing had several candidates.
    pub ambiguous: u64,
    /// Socket events dropped without a matching flow.
    pub sockets_unmatched: u64,
    /// Finished connections whose port was reused between the read and the delete of their
    /// keys.
    pub reuse_races: ReuseRaces,
}

/// Ports reused between the read of a connection's ended keys and their removal, by what became
/// of the next connection's first packets.
#[derive(Default, Debug, Clone, Copy, PartialEq)]
pub struct ReuseRaces {
    /// Put back into the map by the take that found them (`readers::take_ended`).
    pub restored: u64,
    /// Gone with the removal: the next connection's record says `reuse_race`.
    pub start_lost: u64,
}

/// A live key removed as finished, remembered a while.
#[derive(Clone, Copy, Debug)]
struct Finished {
    /// The counters its final record was built from.
    recorded: Counters,
    at_ns: u64,
    /// The take found the next connection in it and put that back.
    restored: bool,
}

/// Events refused because [`Config::pending_max`] was reached.
#[derive(Default, Debug)]
pub struct Refused {
    pub sockets: u64,
    pub drops: u64,
}

/// Packets and bytes added to one observation since the last read.
#[derive(Clone, Copy, Debug, Default)]
pub struct Delta {
    pub packets: u64,
    pub bytes: u64,
}

pub struct Correlator {
    cfg: Config,
    clock: Clock,
    obs: HashMap<FlowKey, Observation>,
    sockets: HashMap<Tuple, SockMeta>,
    /// Drops by the tuple of the dropped packet.
    drops: HashMap<Tuple, DropSeen>,
    /// The rules that drop packets of a client address to a backend and port, traced by the
    /// kernel (`--trace-drop-rules`), with when they came.
    drop_rules: HashMap<Target, (crate::record::DropRule, u64)>,
    emitted: HashMap<ConnId, Emitted>,
    ifnames: HashMap<u32, String>,
    /// IPs routed to this node's pod veths.
    local_pods: HashSet<std::net::IpAddr>,
    /// The window nobody counted in before this agent attached, and the observations it
    /// adopted from the previous one (at most one adoption per agent).
    gap: Option<crate::record::Gap>,
    gapped: HashSet<FlowKey>,
    /// Poll intervals in which the flow map refused a new key, newest last (a bounded few).
    map_full: std::collections::VecDeque<(u64, u64)>,
    /// Live keys removed as finished.
    recently_finished: HashMap<FlowKey, Finished>,
    races: ReuseRaces,
    /// Retired keys of connections already recorded, to delete.
    already_recorded: Vec<FlowKey>,
    /// Live keys whose next connection lost its first packets to such a delete.
    start_lost: HashSet<FlowKey>,
    pub refused: Refused,
}

impl Correlator {
    pub fn new(cfg: Config, clock: Clock) -> Correlator {
        Correlator {
            cfg,
            clock,
            obs: HashMap::default(),
            sockets: HashMap::default(),
            drops: HashMap::default(),
            drop_rules: HashMap::default(),
            emitted: HashMap::default(),
            ifnames: HashMap::default(),
            local_pods: Default::default(),
            gap: None,
            gapped: HashSet::default(),
            map_full: Default::default(),
            recently_finished: HashMap::default(),
            races: ReuseRaces::default(),
            already_recorded: Vec::new(),
            start_lost: HashSet::default(),
            refused: Refused::default(),
        }
    }

    pub fn set_ifname(&mut self, ifindex: u32, name: &str) {
        self.ifnames.insert(ifindex, name.to_owned());
    }

    pub fn set_filter_measured(&mut self, yes: bool) {
        self.cfg.filter_measured = yes;
    }

    pub fn set_local_pods(&mut self, ips: impl IntoIterator<Item = std::net::IpAddr>) {
        self.local_pods = ips.into_iter().collect();
    }

    /// Adopted observations went uncounted from `from_ns` to `to_ns`; their records say so.
    pub fn mark_gap(&mut self, from_ns: u64, to_ns: u64, previous_agent: &str) {
        self.gap = Some(crate::record::Gap {
            from: self.clock.rfc3339(from_ns),
            to: self.clock.rfc3339(to_ns),
            previous_agent: previous_agent.to_owned(),
        });
        self.gapped = self.obs.keys().copied().collect();
    }

    /// The gap, if `c` has an adopted observation.
    fn gap_of(&self, c: &Conn<'_>) -> Option<crate::record::Gap> {
        if self.gapped.is_empty() {
            return None;
        }
        c.legs()
            .flat_map(|l| &l.obs)
            .chain(&c.filter)
            .any(|o| self.gapped.contains(&o.key))
            .then(|| self.gap.clone())?
    }

    /// The flow map refused a new key between `from_ns` and `to_ns`: records of connections
    /// active then may lack one of their hops, and say so.
    pub fn note_map_full(&mut self, from_ns: u64, to_ns: u64) {
        if self.map_full.len() == MAP_FULL_KEPT {
            self.map_full.pop_front();
        }
        self.map_full.push_back((from_ns, to_ns));
    }

    /// Why `c`'s counts or hops may be incomplete, if they may.
    fn incomplete(&self, c: &Conn<'_>) -> Option<Vec<String>> {
        let mut why = Vec::new();
        if self.maybe_incomplete(c) {
            why.push("flow_map_full".to_owned());
        }
        if !self.start_lost.is_empty()
            && c.legs()
                .flat_map(|l| &l.obs)
                .any(|o| self.start_lost.contains(&o.key))
        {
            why.push("reuse_race".to_owned());
        }
        (!why.is_empty()).then_some(why)
    }

    /// Whether the flow map was full while `c` was active.
    fn maybe_incomplete(&self, c: &Conn<'_>) -> bool {
        if self.map_full.is_empty() {
            return false;
        }
        let (first, last) = (c.first_ns(), c.last_ns());
        self.map_full
            .iter()
            .any(|&(from, to)| from <= last && to >= first)
    }

    /// The latest packet any observation was counted for (0 with none).
    pub fn last_counted_ns(&self) -> u64 {
        self.obs.values().map(|o| o.c.last_ns).max().unwrap_or(0)
    }

    #[cfg(test)]
    pub fn known_keys(&self) -> impl Iterator<Item = &FlowKey> {
        self.obs.keys()
    }

    pub fn active(&self) -> usize {
        self.obs.len()
    }

    /// Record the latest cumulative counters of `key`; returns what was added since last time.
    ///
    /// A reused 4-tuple: the kernel moves the old connection's counters to a retired key and
    /// starts the live key again. What was read of the live key before belongs to the retired
    /// one, so it is its baseline (not counted twice in the packet metrics); read retired keys
    /// oldest first and before the live ones. Conntrack tuples are read again for both: the
    /// kernel moved the old one with the counters.
    pub fn observe(&mut self, key: FlowKey, c: Counters) -> Option<(Point, Delta)> {
        let point = Point::from_u8(key.point)?;
        let mut baseline = Counters::default();
        if key.retired != 0 && !self.obs.contains_key(&key) {
            let live = FlowKey { retired: 0, ..key };
            // The client reused the port after the live key was read as finished and before it
            // was removed: the kernel set the recorded connection aside under this key. Not a
            // second record of the old one. The new one's first packets were put back, or went
            // with the removal and its record says it lacks its start.
            if let Some(f) = self
                .recently_finished
                .get(&live)
                .filter(|f| f.recorded.first_ns == c.first_ns)
            {
                if f.restored {
                    self.races.restored += 1;
                } else {
                    self.races.start_lost += 1;
                    self.start_lost.insert(live);
                }
                self.already_recorded.push(key);
                return None;
            }
            if let Some(twin) = self.obs.get_mut(&live) {
                baseline = match twin.before_reuse.take() {
                    Some(c) => *c,
                    None => {
                        twin.ct = Ct::Unknown;
                        twin.ct_tries = 0;
                        std::mem::take(&mut twin.c)
                    }
                };
            }
        }
        let entry = self.obs.entry(key).or_insert_with(|| Observation {
            key,
            tuple: Tuple::from_key(&key),
            point,
            ifindex: key.ifindex,
            c: baseline,
            ct: Ct::Unknown,
            ct_tries: 0,
            before_reuse: None,
        });
        if entry.started_again(&c) {
            // Before its retired twin was read.
            entry.before_reuse = Some(Box::new(std::mem::take(&mut entry.c)));
            entry.ct = Ct::Unknown;
            entry.ct_tries = 0;
        }
        let delta = if c.packets >= entry.c.packets {
            Delta {
                packets: c.packets - entry.c.packets,
                bytes: c.bytes.saturating_sub(entry.c.bytes),
            }
        } else {
            // The kernel entry was recreated.
            Delta {
                packets: c.packets,
                bytes: c.bytes,
            }
        };
        entry.c = c;
        Some((point, delta))
    }

    /// Whether the live `key` started again for a new connection since it was last read (a
    /// reused 4-tuple), by `c`, what it holds now.
    pub fn restarted(&self, key: &FlowKey, c: &Counters) -> bool {
        self.obs.get(key).is_some_and(|o| o.started_again(c))
    }

    /// Egress observations whose conntrack entry is still to be read (a few tries each: a key
    /// the kernel noted nothing for, e.g. without BTF offsets, is not asked for forever).
    pub fn wants_ct(&self) -> Vec<FlowKey> {
        self.obs
            .values()
            .filter(|o| o.point.notes_ct() && o.ct == Ct::Unknown && o.ct_tries < CT_TRIES)
            .map(|o| o.key)
            .collect()
    }

    /// What the kernel noted of `key`'s conntrack entry (`None`: nothing, yet).
    pub fn set_ct(&mut self, key: &FlowKey, ct: Option<CtOrig>) {
        let Some(o) = self.obs.get_mut(key) else {
            return;
        };
        match ct {
            None => o.ct_tries += 1,
            Some(c) if c.ctinfo == CT_UNTRACKED => o.ct = Ct::Untracked,
            Some(c) => {
                let mut t = Tuple::from_raw(
                    key.proto,
                    key.family,
                    &c.src,
                    u16::from_be(c.sport_be),
                    &c.dst,
                    u16::from_be(c.dport_be),
                );
                // ICMP ids and types are not ports; observations carry none.
                if !t.has_ports() {
                    t.src.port = 0;
                    t.dst.port = 0;
                }
                o.ct = Ct::Original {
                    tuple: t,
                    zone: c.zone,
                };
            }
        }
    }

    pub fn add_socket(&mut self, ev: &SocketEvent, now_ns: u64) {
        if self.sockets.len() >= self.cfg.pending_max {
            self.refused.sockets += 1;
            return;
        }
        let comm_len = ev
            .comm
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(ev.comm.len());
        self.sockets.insert(
            Tuple::from_socket(ev),
            SockMeta {
                pid: ev.tgid,
                comm: String::from_utf8_lossy(&ev.comm[..comm_len]).into_owned(),
                cgroup_id: ev.cgroup_id,
                asked: Endpoint {
                    ip: addr(ev.family, &ev.asked_dst),
                    port: ev.asked_dport,
                },
                ts_ns: ev.ts_ns,
                received_ns: now_ns,
            },
        );
    }

    pub fn add_drop(&mut self, ev: &DropEvent, reason: String, location: String, now_ns: u64) {
        let tuple = Tuple::from_drop(ev);
        if self.drops.len() >= self.cfg.pending_max && !self.drops.contains_key(&tuple) {
            self.refused.drops += 1;
            return;
        }
        let d = self.drops.entry(tuple).or_insert_with(|| DropSeen {
            reason: String::new(),
            location: String::new(),
            ifindex: ev.ifindex,
            packets: 0,
            last_ns: 0,
            received_ns: now_ns,
        });
        d.reason = reason;
        d.location = location;
        d.ifindex = ev.ifindex;
        d.packets += 1;
        d.last_ns = ev.ts_ns;
        d.received_ns = now_ns;
    }

    /// The kernel's trace named the rule that drops packets of `target`.
    pub fn add_drop_rule(&mut self, target: Target, rule: crate::record::DropRule, now_ns: u64) {
        if self.drop_rules.len() < self.cfg.pending_max {
            self.drop_rules.insert(target, (rule, now_ns));
        }
    }

    /// A drop of this connection: a packet from or to its client endpoint (DNAT keeps that one),
    /// or, without ports, of one of its tuples.
    fn drop_of(&self, c: &Conn<'_>) -> Option<(&Tuple, &DropSeen)> {
        let id = c.id();
        self.drops.iter().find(|(t, _)| {
            t.proto == id.proto
                && if t.has_ports() {
                    t.src == id.client || t.dst == id.client
                } else {
                    c.legs()
                        .any(|l| **t == l.orig || (t.src == l.orig.dst && t.dst == l.orig.src))
                }
        })
    }

    /// Build the records due at `now_ns`: final ones for finished connections, interim ones for
    /// long connections; `flush` says what shutdown asks for on top.
    pub fn collect(&mut self, now_ns: u64, flush: Flush) -> Collected {
        let mut out = Collected::default();
        // Taken out for the walk (records are built from `self`'s other state), not cloned.
        let observations = std::mem::take(&mut self.obs);
        let conns = conn::group(observations.values());
        let mut used_sockets = Vec::new();
        let mut used_drops = Vec::new();
        let mut live = HashSet::with_capacity_and_hasher(conns.len(), Default::default());
        for c in &conns {
            if c.ambiguous {
                out.ambiguous += 1;
            }
            let id = c.id();
            live.insert(id);
            let last = c.last_ns();
            let (fo, fr) = conn_flags(c);
            let tcp_done = id.proto == IPPROTO_TCP
                && ((fo | fr) & TCP_RST != 0 || (fo & TCP_FIN != 0 && fr & TCP_FIN != 0));
            let idle = now_ns.saturating_sub(last);
            let idle_limit = if id.proto == IPPROTO_TCP && fr != 0 && !tcp_done {
                self.cfg.tcp_idle_timeout_ns
            } else {
                self.cfg.idle_timeout_ns
            };
            let is_final = flush == Flush::All
                || (tcp_done && idle >= self.cfg.linger_ns)
                || idle >= idle_limit;
            let packets: u64 = c.legs().flat_map(|l| &l.obs).map(|o| o.c.packets).sum();
            let checkpoint = flush == Flush::Checkpoint;
            let due = match self.emitted.get(&id) {
                Some(e) => {
                    (checkpoint || now_ns.saturating_sub(e.at_ns) >= self.cfg.flush_ns)
                        && e.packets != packets
                }
                None => checkpoint || now_ns.saturating_sub(c.first_ns()) >= self.cfg.flush_ns,
            };
            if !is_final && !due {
                continue;
            }
            let sock_key = client_tuple(c);
            let sock = sock_key.and_then(|t| self.sockets.get(&t));
            out.records.push(self.build(c, sock, is_final, now_ns));
            if is_final {
                self.emitted.remove(&id);
                used_sockets.extend(sock_key);
                used_drops.extend(self.drop_of(c).map(|(t, _)| *t));
                // A connection only the filter table saw has them in its leg too: once each.
                for leg in c.legs() {
                    for o in leg.obs.iter().filter(|o| !o.point.is_filter()) {
                        out.finished.push(o.key);
                    }
                }
                out.finished.extend(c.filter.iter().map(|o| o.key));
            } else {
                self.emitted.insert(
                    id,
                    Emitted {
                        at_ns: now_ns,
                        packets,
                    },
                );
            }
        }
        drop(conns);
        self.obs = observations;
        self.forget_finished(&mut out, now_ns);
        // An identity that no connection has any more (its start moved: an earlier key was read
        // late) would otherwise stay for ever.
        self.emitted.retain(|id, _| live.contains(id));
        for t in used_sockets {
            self.sockets.remove(&t);
        }
        for t in used_drops {
            self.drops.remove(&t);
        }
        let ttl = self.cfg.socket_ttl_ns;
        let before = self.sockets.len();
        self.sockets
            .retain(|_, s| now_ns.saturating_sub(s.received_ns) < ttl);
        out.sockets_unmatched = (before - self.sockets.len()) as u64;
        self.drops
            .retain(|_, d| now_ns.saturating_sub(d.received_ns) < ttl);
        self.drop_rules
            .retain(|_, (_, at)| now_ns.saturating_sub(*at) < ttl);
        out
    }

    /// Drop the observations of `out.finished`, remembering the live keys a while (a port
    /// reused before their delete shows up as a retired twin at the next read); add the retired
    /// keys of connections already recorded to what the kernel is to delete.
    fn forget_finished(&mut self, out: &mut Collected, now_ns: u64) {
        for k in &out.finished {
            if let Some(o) = self.obs.remove(k)
                && k.retired == 0
            {
                let f = Finished {
                    recorded: o.c,
                    at_ns: now_ns,
                    restored: false,
                };
                self.recently_finished.insert(*k, f);
            }
            self.gapped.remove(k);
            self.start_lost.remove(k);
        }
        // A retired twin shows up at the next read after the delete, a poll later.
        let keep = 3 * self.cfg.linger_ns;
        self.recently_finished
            .retain(|_, f| now_ns.saturating_sub(f.at_ns) < keep);
        // A next connection that sent nothing after the delete has no key to finish.
        self.start_lost
            .retain(|k| self.recently_finished.contains_key(k) || self.obs.contains_key(k));
        out.reuse_races = std::mem::take(&mut self.races);
        out.finished.append(&mut self.already_recorded);
    }

    /// The counters a finished live key's final record was built from (until it is forgotten).
    pub fn recorded(&self, key: &FlowKey) -> Option<Counters> {
        self.recently_finished.get(key).map(|f| f.recorded)
    }

    /// Finished keys in which the removal found the next connection and put it back: their
    /// retired twins hold the recorded connection and go unread, with nothing lost.
    pub fn restored(&mut self, keys: &[FlowKey]) {
        for k in keys {
            if let Some(f) = self.recently_finished.get_mut(k) {
                f.restored = true;
            }
        }
    }

    fn hop(&self, leg: &Leg<'_>, o: &Observation) -> Hop {
        self.obs_hop(o, !leg.is_orig(o))
    }

    fn obs_hop(&self, o: &Observation, reply: bool) -> Hop {
        Hop {
            point: o.point.as_str().to_owned(),
            iface: Some(
                self.ifnames
                    .get(&o.ifindex)
                    .cloned()
                    .unwrap_or_else(|| format!("if{}", o.ifindex)),
            ),
            node: self.cfg.node.clone(),
            dir: if reply {
                Direction::Reply
            } else {
                Direction::Orig
            },
            tuple: o.tuple.view(),
            packets: Some(o.c.packets),
            bytes: Some(o.c.bytes),
            first_seen: self.clock.rfc3339(o.c.first_ns),
            last_seen: self.clock.rfc3339(o.c.last_ns),
            tcp_flags: (o.tuple.proto == IPPROTO_TCP).then(|| tcp_flags_string(o.c.tcp_flags)),
            passed: None,
        }
    }

    fn build(
        &self,
        c: &Conn<'_>,
        sock: Option<&SockMeta>,
        is_final: bool,
        now_ns: u64,
    ) -> FlowRecord {
        let any = c.pre.as_ref().or(c.post.as_ref()).expect("non-empty");
        let proto = any.orig.proto;
        let sent = client_tuple(c);
        // A socket load balancer rewrote the destination in connect()/sendmsg(): the app asked
        // for another one than its packets carry (the agent's socket hooks run first).
        let socket_nat = sock
            .zip(sent)
            .filter(|(s, t)| s.asked.port != 0 && s.asked != t.dst)
            .map(|(s, t)| Tuple {
                proto,
                src: t.src,
                dst: s.asked,
            });
        let pre = socket_nat.or(sent);
        let local_process =
            c.pre.is_none() && c.post.as_ref().and_then(Leg::local_original).is_some();
        let post_leg = c.post.as_ref().filter(|l| l.left_stack());
        let post = post_leg.map(|l| l.orig).or(socket_nat.and(sent));
        let translated = matches!((pre, post), (Some(a), Some(b)) if a != b);

        let (mut hops, totals) = self.hops_and_totals(c);
        let socket = sock.map(|s| {
            let (hop, info) = self.socket_hop(s, pre, proto);
            hops.push((false, 0, hop));
            info
        });
        hops.sort_by_key(|(reply, first, h)| (*reply, *first, point_order(&h.point)));
        let hops: Vec<Hop> = hops.into_iter().map(|(_, _, h)| h).collect();
        let drop = self.record_drop(c);
        let policy = self.policy_view(c, &drop, &hops);
        let views = Views::of(&hops);
        FlowRecord {
            schema: SCHEMA.to_owned(),
            time: self.clock.rfc3339(now_ns),
            node: self.cfg.node.clone(),
            proto: proto_name(proto),
            family: any.orig.family_name().to_owned(),
            observed_as: self.observed_as(
                c,
                local_process || c.legs().any(Leg::sent_by_local_pod),
                post_leg,
            ),
            pre_dnat: pre.map(|t| t.view()),
            post_dnat: post.map(|t| t.view()),
            translated,
            translation: translated.then(|| match socket_nat {
                Some(asked) => self.socket_translation(c, &asked, post.unwrap_or(asked)),
                None => self.translation(c, post_leg, pre, local_process),
            }),
            socket,
            last_seen: crate::record::LastSeen {
                node: self.cfg.node.clone(),
                point: views.last_point.to_owned(),
            },
            wire_view: views.wire,
            policy_view: policy,
            hops,
            drop,
            state: state(proto, conn_flags(c), &totals, is_final).to_owned(),
            totals,
            is_final,
            src_pod: None,
            dst_pod: None,
            service: None,
            start: self.clock.rfc3339(c.first_ns()),
            end: self.clock.rfc3339(c.last_ns()),
            incomplete: self.incomplete(c),
            gap: self.gap_of(c),
        }
    }

    /// Sender, receiver, both (a same-node connection) or neither (transit), from where the
    /// client's packets entered and where they went.
    fn observed_as(&self, c: &Conn<'_>, from_pod: bool, post_leg: Option<&Leg<'_>>) -> ObservedAs {
        // Delivered to a local pod, or addressed to one (a drop may have stopped it first).
        let to_pod = post_leg.is_some_and(|l| {
            l.obs
                .iter()
                .any(|o| l.is_orig(o) && o.point == Point::PodEgress)
        }) || c
            .legs()
            .any(|l| !l.sent_by_local_pod() && self.local_pods.contains(&l.orig.dst.ip))
            // Where the filter table saw it addressed, after DNAT (it may have stopped it there).
            || c
                .filter_orig()
                .any(|o| self.local_pods.contains(&o.tuple.dst.ip));
        match (from_pod, to_pod) {
            (true, true) => ObservedAs::Local,
            (true, false) => ObservedAs::Sender,
            (false, true) => ObservedAs::Receiver,
            (false, false) => ObservedAs::Transit,
        }
    }

    /// Where the rewrite happened: between the point where the client's tuple entered (a pod's
    /// veth, or the uplink for a client outside the node) and the first egress point of the
    /// translated tuple, i.e. inside this node's IP stack.
    fn translation(
        &self,
        c: &Conn<'_>,
        post_leg: Option<&Leg<'_>>,
        pre: Option<Tuple>,
        local_process: bool,
    ) -> Translation {
        // A process of this node: its own socket is where the client's tuple was last seen.
        let after = match c.pre.as_ref() {
            Some(l) => l.entry_point().map_or("pod_ingress", Point::as_str),
            None if local_process => "socket",
            None => "pod_ingress",
        };
        let before = post_leg
            .and_then(|l| {
                l.obs
                    .iter()
                    .filter(|o| l.is_orig(o) && o.point.is_egress())
                    .min_by_key(|o| o.c.first_ns)
            })
            .map(|o| o.point.as_str())
            .unwrap_or("unknown");
        // Where the filter table saw one of the two tuples, the rewrite is on the other side of
        // it: DNAT before the table (it saw the translated tuple), SNAT after it (it saw the
        // client's own).
        let filter_saw = |t: Option<Tuple>| {
            let t = t?;
            c.filter_orig()
                .filter(|o| o.point.filter_passed().is_some() && o.tuple == t)
                .min_by_key(|o| o.c.first_ns)
                .map(|o| o.point.as_str())
        };
        let after = filter_saw(pre).unwrap_or(after);
        let before = filter_saw(post_leg.map(|l| l.orig)).unwrap_or(before);
        let (evidence, zone) = evidence(post_leg, pre);
        Translation {
            node: self.cfg.node.clone(),
            after: after.to_owned(),
            before: before.to_owned(),
            evidence: evidence.to_owned(),
            kind: match (pre, post_leg) {
                (Some(p), Some(l)) => nat_kind(&p, &l.orig),
                _ => "dnat",
            }
            .to_owned(),
            // Only the kernel's NAT state says netfilter did it; a join by client endpoint
            // only infers that something in the stack did.
            mechanism: zone.map(|_| "netfilter".to_owned()),
            ct_zone: zone,
        }
    }

    /// A socket load balancer chose the backend in connect()/sendmsg(): no packet carried what
    /// the app asked for, and conntrack knows nothing of it. The evidence is the kernel's own:
    /// the address of the call, seen by the agent's cgroup hook running first, and the socket's
    /// first packet.
    fn socket_translation(&self, c: &Conn<'_>, asked: &Tuple, sent: Tuple) -> Translation {
        let first_seen = c
            .legs()
            .flat_map(|l| l.obs.iter().filter(|o| l.is_orig(o)))
            .min_by_key(|o| o.c.first_ns)
            .map_or(Point::PodIngress, |o| o.point);
        Translation {
            node: self.cfg.node.clone(),
            after: "socket".into(),
            before: first_seen.as_str().into(),
            evidence: "socket".into(),
            kind: nat_kind(asked, &sent).into(),
            mechanism: Some("socket".into()),
            ct_zone: None,
        }
    }

    /// Every observation as a hop (reply?, first seen, hop), and the totals of both directions:
    /// the largest count of any hop in each.
    fn hops_and_totals(&self, c: &Conn<'_>) -> (Vec<(bool, u64, Hop)>, Totals) {
        let mut hops = Vec::new();
        for leg in c.legs() {
            // Filter points are hops of their own (`filter_hops`), with what passed the table.
            for o in leg.obs.iter().filter(|o| !o.point.is_filter()) {
                hops.push((!leg.is_orig(o), o.c.first_ns, self.hop(leg, o)));
            }
        }
        hops.extend(self.filter_hops(c));
        let mut totals = Totals::default();
        for (reply, _, h) in &hops {
            let (p, b) = (h.packets.unwrap_or(0), h.bytes.unwrap_or(0));
            if *reply {
                totals.reply_packets = totals.reply_packets.max(p);
                totals.reply_bytes = totals.reply_bytes.max(b);
            } else {
                totals.packets = totals.packets.max(p);
                totals.bytes = totals.bytes.max(b);
            }
        }
        (hops, totals)
    }

    /// The filter table's observations as hops: one per hook and tuple, with how many of its
    /// packets came out of the table (`passed`).
    fn filter_hops(&self, c: &Conn<'_>) -> Vec<(bool, u64, Hop)> {
        let passed_of = |before: &Observation| {
            let p = before.point.filter_passed();
            c.filter
                .iter()
                .filter(|o| Some(o.point) == p && o.tuple == before.tuple)
                .map(|o| o.c.packets)
                .sum::<u64>()
        };
        let has_before = |after: &Observation| {
            c.filter
                .iter()
                .any(|o| o.point.filter_passed() == Some(after.point) && o.tuple == after.tuple)
        };
        c.filter
            .iter()
            .filter(|o| o.point.filter_passed().is_some() || !has_before(o))
            .map(|o| {
                let reply = !c.is_filter_orig(o);
                let mut hop = self.obs_hop(o, reply);
                if o.point.filter_passed().is_some() {
                    hop.passed = Some(passed_of(o));
                }
                (reply, o.c.first_ns, hop)
            })
            .collect()
    }

    /// The socket as a hop (what the application asked for) and the process behind it.
    fn socket_hop(&self, s: &SockMeta, pre: Option<Tuple>, proto: u8) -> (Hop, SocketInfo) {
        let asked = Tuple {
            proto,
            src: pre.map(|t| t.src).unwrap_or(s.asked),
            dst: s.asked,
        };
        let hop = Hop {
            point: "socket".into(),
            iface: None,
            node: self.cfg.node.clone(),
            dir: Direction::Orig,
            tuple: pre.unwrap_or(asked).view(),
            packets: None,
            bytes: None,
            first_seen: self.clock.rfc3339(s.ts_ns),
            last_seen: self.clock.rfc3339(s.ts_ns),
            tcp_flags: None,
            passed: None,
        };
        let info = SocketInfo {
            pid: s.pid,
            comm: s.comm.clone(),
            cgroup_id: s.cgroup_id,
            asked: asked.view(),
        };
        (hop, info)
    }

    fn record_drop(&self, c: &Conn<'_>) -> Option<crate::record::Drop> {
        self.drop_of(c).map(|(t, d)| crate::record::Drop {
            node: self.cfg.node.clone(),
            reason: d.reason.clone(),
            point: drop_point(&d.location),
            location: d.location.clone(),
            iface: self.ifnames.get(&d.ifindex).cloned(),
            tuple: t.view(),
            packets: d.packets,
            last_seen: self.clock.rfc3339(d.last_ns),
            rule: d
                .reason
                .starts_with("NETFILTER")
                .then(|| {
                    let target = Target {
                        proto: t.proto,
                        src: t.src.ip,
                        dst: t.dst.ip,
                        dport: t.dst.port,
                    };
                    self.drop_rules.get(&target).map(|(r, _)| r.clone())
                })
                .flatten(),
        })
    }
}

/// Whether the kernel's NAT state confirms the join: the conntrack entries noted where the
/// translated tuple left the stack name the pre-DNAT tuple as their original. With the zone of
/// the entry that confirms it.
fn evidence(post_leg: Option<&Leg<'_>>, pre: Option<Tuple>) -> (&'static str, Option<u16>) {
    let originals: Vec<(Tuple, u16)> = post_leg
        .into_iter()
        .flat_map(|l| l.obs.iter().filter(|o| l.is_orig(o)))
        .filter_map(|o| match o.ct {
            Ct::Original { tuple, zone } => Some((tuple, zone)),
            _ => None,
        })
        .collect();
    let confirming = pre.and_then(|p| originals.iter().find(|(t, _)| *t == p));
    match confirming {
        _ if originals.is_empty() => ("client_endpoint", None),
        Some((_, zone)) => ("conntrack", Some(*zone)),
        None => ("conntrack_mismatch", None),
    }
}

/// What the rewrite changed: the destination (DNAT), the source (SNAT), or both.
fn nat_kind(pre: &Tuple, post: &Tuple) -> &'static str {
    match (pre.dst != post.dst, pre.src != post.src) {
        (true, true) => "dnat_snat",
        (false, true) => "snat",
        _ => "dnat",
    }
}

/// TCP: reset, closed, syn_sent or established from the flags both ways; others active or ended.
fn state(proto: u8, (fo, fr): (u8, u8), totals: &Totals, is_final: bool) -> &'static str {
    if proto != IPPROTO_TCP {
        return if is_final { "ended" } else { "active" };
    }
    if (fo | fr) & TCP_RST != 0 {
        "reset"
    } else if fo & TCP_FIN != 0 && fr & TCP_FIN != 0 {
        "closed"
    } else if totals.reply_packets == 0 && fo & TCP_SYN != 0 {
        "syn_sent"
    } else {
        "established"
    }
}

/// What the client's direction looked like along this node: the last point it reached and the
/// wire tuple.
struct Views<'a> {
    last_point: &'a str,
    wire: Option<TupleView>,
}

impl<'a> Views<'a> {
    fn of(hops: &'a [Hop]) -> Views<'a> {
        let orig_points: Vec<(&str, &TupleView)> = hops
            .iter()
            .filter(|h| h.dir == Direction::Orig)
            .map(|h| (h.point.as_str(), &h.tuple))
            .collect();
        Views {
            last_point: orig_points
                .iter()
                .map(|(p, _)| *p)
                .max_by_key(|p| path_order(p))
                .unwrap_or("socket"),
            // Where it left onto the wire, else where it came in from it (a NodePort's client
            // came in from one wire and left on another: the next hop's firewall sees the latter).
            wire: ["uplink_egress", "uplink_ingress"]
                .iter()
                .find_map(|w| orig_points.iter().find(|(p, _)| p == w))
                .map(|(_, t)| (*t).clone()),
        }
    }
}

/// Position along a connection's path through one node: entering (socket, pod veth or uplink
/// ingress), the filter table, then leaving (uplink egress or pod veth egress).
fn path_order(p: &str) -> u8 {
    match p {
        "socket" => 0,
        "pod_ingress" | "uplink_ingress" => 1,
        p if p.starts_with("filter_") => 2,
        _ => 3,
    }
}

/// The layer a kernel function belongs to, for a person: `nft_do_chain+0x3e8` -> `netfilter`.
fn drop_point(location: &str) -> String {
    let f = location.split('+').next().unwrap_or(location);
    let layer = [
        (&["nf_", "nft_", "ipt_", "ip6t_", "ebt_"][..], "netfilter"),
        (&["tcf_", "tcx_", "sch_", "tc_"][..], "tc"),
        (&["ip_", "ip6_", "ipv6_"][..], "ip"),
        (&["tcp_"][..], "tcp"),
        (&["udp"][..], "udp"),
    ]
    .iter()
    .find(|(prefixes, _)| prefixes.iter().any(|p| f.starts_with(p)))
    .map(|(_, l)| *l);
    layer.unwrap_or(f).to_owned()
}

fn point_order(p: &str) -> u8 {
    match p {
        "socket" => 0,
        "pod_ingress" => 1,
        "uplink_egress" => 2,
        "uplink_ingress" => 3,
        "pod_egress" => 4,
        _ => 5,
    }
}

/// TCP flags OR-ed over (orig, reply) observations.
fn conn_flags(c: &Conn<'_>) -> (u8, u8) {
    let mut o = 0;
    let mut r = 0;
    for leg in c.legs() {
        for ob in &leg.obs {
            if leg.is_orig(ob) {
                o |= ob.c.tcp_flags;
            } else {
                r |= ob.c.tcp_flags;
            }
        }
    }
    (o, r)
}

/// What the client sent before any NAT on this node: the tuple that entered from a pod or the
/// wire, or, for a process of this node, the original tuple of its conntrack entry.
fn client_tuple(c: &Conn<'_>) -> Option<Tuple> {
    c.pre
        .as_ref()
        .or(c.post.as_ref().filter(|l| l.sent_by_local_pod()))
        .map(|l| l.orig)
        .or_else(|| c.post.as_ref().and_then(Leg::local_original))
}

#[cfg(test)]
mod bench;
#[cfg(test)]
mod tests;
