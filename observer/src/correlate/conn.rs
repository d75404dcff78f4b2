//! Grouping kernel observations into connections.
//!
//! An observation is one direction of one tuple at one point. Observations of the same address
//! pair form a *leg*; a DNAT-ed connection has two legs on the sending node that share the client
//! endpoint: the pre-DNAT leg (seen entering from the pod) and the post-DNAT leg (seen leaving the
//! IP stack). They are joined by the conntrack entry the kernel read where the translated tuple
//! left the stack; without one, by the client endpoint (pod IP and source port), which DNAT
//! alone leaves unchanged.
//!
//! One address pair can carry several connections one after another (a client reusing its
//! source port): the kernel sets an ended connection's counters aside under a retired key when a
//! new SYN reuses the tuple, and `instances` splits the pair there.

use observer_common::{FlowKey, MARK_SYN_ONLY, Point, TCP_FIN, TCP_RST};

use super::{
    HashMap,
    tuple::{Endpoint, Tuple},
};

/// Counters of one observation, summed over CPUs: the kernel's own value type.
pub use observer_common::FlowCounters as Counters;

#[derive(Clone, Debug)]
pub struct Observation {
    pub key: FlowKey,
    pub tuple: Tuple,
    pub point: Point,
    pub ifindex: u32,
    pub c: Counters,
    /// The packet's conntrack entry, as the kernel saw it when the key was created.
    pub ct: Ct,
    /// Reads of that entry that found nothing (the key goes, and this with it).
    pub ct_tries: u8,
    /// What was read of this live key before the kernel started it again for a reused 4-tuple,
    /// until its retired twin (which holds that connection now) is read.
    /// Boxed: rarely set, and 40 bytes on every observation otherwise.
    pub before_reuse: Option<Box<Counters>>,
}

impl Observation {
    /// Counters of an ended connection the kernel set aside when its 4-tuple was reused.
    pub fn is_retired(&self) -> bool {
        self.key.retired != 0
    }

    /// `c`, read now of this live key, is a new connection's: the kernel started the key again
    /// for a reused 4-tuple since the last read.
    pub fn started_again(&self, c: &Counters) -> bool {
        !self.is_retired() && self.c.packets > 0 && c.first_ns != self.c.first_ns
    }
}

/// What the kernel said of an egress observation's conntrack entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Ct {
    /// Not read (yet), or not readable here.
    #[default]
    Unknown,
    Untracked,
    /// The ORIGINAL direction's tuple (what the client sent before any NAT) and the entry's
    /// conntrack zone.
    Original {
        tuple: Tuple,
        zone: u16,
    },
}

/// One address pair, oriented client -> server.
#[derive(Debug)]
pub struct Leg<'a> {
    /// The client -> server tuple.
    pub orig: Tuple,
    pub obs: Vec<&'a Observation>,
}

impl Leg<'_> {
    pub fn is_orig(&self, o: &Observation) -> bool {
        o.tuple == self.orig
    }

    fn orig_at(&self, pred: impl Fn(Point) -> bool) -> bool {
        self.obs.iter().any(|o| self.is_orig(o) && pred(o.point))
    }

    /// The client pod sent it through this node's pod veth.
    pub fn sent_by_local_pod(&self) -> bool {
        self.orig_at(|p| p == Point::PodIngress)
    }

    /// It left this node's IP stack (to the wire or to a local pod).
    pub fn left_stack(&self) -> bool {
        self.orig_at(Point::is_egress)
    }

    pub fn first_ns(&self) -> u64 {
        self.obs.iter().map(|o| o.c.first_ns).min().unwrap_or(0)
    }

    pub fn last_ns(&self) -> u64 {
        self.obs.iter().map(|o| o.c.last_ns).max().unwrap_or(0)
    }

    /// A FIN or RST went through it, either way.
    fn ended(&self) -> bool {
        self.obs
            .iter()
            .any(|o| o.c.tcp_flags & (TCP_FIN | TCP_RST) != 0)
    }

    /// A leg that left the stack (or met the filter table at OUTPUT) without entering it was
    /// sent by a process of this node (a hostNetwork client): no tc hook saw its tuple before
    /// NAT, conntrack did.
    pub fn local_original(&self) -> Option<Tuple> {
        if self.entered() || !(self.left_stack() || self.orig_at(|p| p == Point::FilterOutput)) {
            return None;
        }
        self.ct_original().filter(|t| *t != self.orig)
    }

    /// What conntrack says the client sent, where this leg's own direction left the stack (or,
    /// for a leg only the filter table saw, where it met the table).
    fn ct_original(&self) -> Option<Tuple> {
        self.obs.iter().find_map(|o| match o.ct {
            Ct::Original { tuple, .. } if self.is_orig(o) && o.point.notes_ct() => Some(tuple),
            _ => None,
        })
    }

    /// Its client -> server direction entered this node's IP stack: from a local pod, or from
    /// the wire (a client outside the node, e.g. of a NodePort).
    pub fn entered(&self) -> bool {
        self.orig_at(|p| p == Point::PodIngress || p == Point::UplinkIngress)
    }

    /// Where it entered: the pod's veth or the uplink.
    pub fn entry_point(&self) -> Option<Point> {
        [Point::PodIngress, Point::UplinkIngress]
            .into_iter()
            .find(|&p| self.orig_at(|q| q == p))
    }

    fn is_pre_candidate(&self) -> bool {
        self.entered() && !self.left_stack()
    }
}

/// A connection as seen on this node: one leg, or a pre-DNAT leg and a post-DNAT leg.
#[derive(Debug)]
pub struct Conn<'a> {
    pub pre: Option<Leg<'a>>,
    pub post: Option<Leg<'a>>,
    /// The pairing had more than one candidate (see [`group`]).
    pub ambiguous: bool,
    /// What the netfilter programs around the filter table saw of it, both directions
    /// ([`attach_filter`]).
    pub filter: Vec<&'a Observation>,
}

impl<'a> Conn<'a> {
    pub fn legs(&self) -> impl Iterator<Item = &Leg<'a>> {
        self.pre.iter().chain(self.post.iter())
    }

    /// Stable identity across polls: the client endpoint, plus the server for port-less
    /// protocols, and when it started (a reused 4-tuple is another connection).
    pub fn id(&self) -> ConnId {
        let leg = self.pre.as_ref().or(self.post.as_ref()).expect("non-empty");
        ConnId {
            start_ns: self.first_ns(),
            ..conn_id(&leg.orig)
        }
    }

    pub fn last_ns(&self) -> u64 {
        self.legs().map(Leg::last_ns).max().unwrap_or(0)
    }

    pub fn first_ns(&self) -> u64 {
        self.legs().map(Leg::first_ns).min().unwrap_or(0)
    }

    /// What the client sent as conntrack knows it: a pre-DNAT leg's tuple, the post leg's, and
    /// the original its conntrack entry names.
    fn client_tuples(&self) -> impl Iterator<Item = Tuple> + '_ {
        self.legs()
            .map(|l| l.orig)
            .chain(self.post.as_ref().and_then(Leg::ct_original))
    }

    /// Whether a filter observation of this connection is of the client's direction: sent from
    /// the client's endpoint as it sent it, or as a leg carried it (a source NAT after the filter
    /// table changes the former, one on another node the latter).
    pub fn is_filter_orig(&self, o: &Observation) -> bool {
        self.client_tuples().any(|t| t.src == o.tuple.src)
    }

    /// The client's side: the filter observations of its direction (the others are replies).
    pub fn filter_orig(&self) -> impl Iterator<Item = &&'a Observation> + '_ {
        self.filter.iter().filter(|o| self.is_filter_orig(o))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnId {
    pub proto: u8,
    pub client: Endpoint,
    pub server: Option<Endpoint>,
    pub start_ns: u64,
}

/// The client-endpoint part of an identity (the join key when the kernel gave no NAT state).
fn conn_id(orig: &Tuple) -> ConnId {
    ConnId {
        proto: orig.proto,
        client: orig.src,
        server: (!orig.has_ports()).then_some(orig.dst),
        start_ns: 0,
    }
}

type LegKey = (u8, Endpoint, Endpoint);

fn leg_key(t: &Tuple) -> LegKey {
    if t.src <= t.dst {
        (t.proto, t.src, t.dst)
    } else {
        (t.proto, t.dst, t.src)
    }
}

/// Orient a leg: the side that sent a bare SYN opened it; failing that (UDP, or TCP first seen
/// mid-stream), the side whose packet was seen first.
fn orient<'a>(obs: Vec<&'a Observation>) -> Leg<'a> {
    let opener = obs
        .iter()
        .find(|o| o.c.marks & MARK_SYN_ONLY != 0)
        .or_else(|| obs.iter().min_by_key(|o| (o.c.first_ns, o.point)))
        .expect("a leg has at least one observation");
    Leg {
        orig: opener.tuple,
        obs,
    }
}

/// Group observations into connections.
///
/// A leg that entered from a local pod but never left the stack is a pre-DNAT candidate, and a
/// leg that left the stack but never entered from a local pod is a post-DNAT candidate. First,
/// exactly: a post-DNAT leg whose conntrack entry names a pre-DNAT leg's tuple as its original is
/// that connection, whatever NAT did to the client's address and port (masquerade, a hairpin, a
/// rewritten source port). The rest are joined by client endpoint, which DNAT alone keeps: one
/// of each pair up; several of each (a UDP socket talking to several Services from one port at
/// once) are paired in time order and flagged ambiguous.
///
/// The filter table's observations are not legs: under DNAT and SNAT together (a NodePort) the
/// filter saw a tuple that neither entered nor left the node. They join afterwards
/// ([`attach_filter`]); those that join none are connections of their own, which no tc point
/// saw: a process of the node whose packets the filter table dropped at OUTPUT, or traffic on
/// interfaces the agent does not watch.
pub fn group<'a>(observations: impl IntoIterator<Item = &'a Observation>) -> Vec<Conn<'a>> {
    let mut pairs: HashMap<LegKey, Vec<&Observation>> = HashMap::default();
    let mut filter = Vec::new();
    for o in observations {
        if o.point.is_filter() {
            filter.push(o);
        } else {
            pairs.entry(leg_key(&o.tuple)).or_default().push(o);
        }
    }
    let legs = pairs
        .into_values()
        .flat_map(instances)
        .map(orient)
        .collect();
    let (mut conns, rest) = pair_by_conntrack(legs);
    let mut by_client: HashMap<ConnId, Vec<Leg<'_>>> = HashMap::default();
    for leg in rest {
        by_client.entry(conn_id(&leg.orig)).or_default().push(leg);
    }

    for (_, legs) in by_client {
        let (mut pre, mut post, mut whole) = (Vec::new(), Vec::new(), Vec::new());
        for leg in legs {
            match (leg.sent_by_local_pod(), leg.left_stack()) {
                (true, false) => pre.push(leg),
                (false, true) => post.push(leg),
                _ => whole.push(leg),
            }
        }
        let ambiguous = pre.len() > 1 || post.len() > 1;
        pre.sort_by_key(Leg::first_ns);
        post.sort_by_key(Leg::first_ns);
        let mut post = post.into_iter().peekable();
        for p in pre {
            let q = post.next_if(|_| true);
            conns.push(Conn {
                pre: Some(p),
                post: q,
                ambiguous,
                filter: Vec::new(),
            });
        }
        for q in post {
            conns.push(Conn {
                pre: None,
                post: Some(q),
                ambiguous,
                filter: Vec::new(),
            });
        }
        for w in whole {
            // A single leg is both views: put it where the record builder looks first.
            conns.push(Conn {
                pre: None,
                post: Some(w),
                ambiguous: false,
                filter: Vec::new(),
            });
        }
    }
    let unattached = attach_filter(&mut conns, filter);
    conns.extend(filter_only(unattached));
    conns
}

/// Connections only the filter table saw, one per address pair (and reuse of it).
fn filter_only(obs: Vec<&Observation>) -> impl Iterator<Item = Conn<'_>> {
    let mut pairs: HashMap<LegKey, Vec<&Observation>> = HashMap::default();
    for o in obs {
        pairs.entry(leg_key(&o.tuple)).or_default().push(o);
    }
    pairs
        .into_values()
        .flat_map(instances)
        .map(orient)
        .map(|leg| Conn {
            filter: leg.obs.clone(),
            pre: None,
            post: Some(leg),
            ambiguous: false,
        })
}

/// Give each filter observation to its connection. Exactly by conntrack where the kernel read the
/// packet's entry: the entry's original tuple is what the client sent, before any NAT, in both
/// directions. Otherwise by the observation's own tuple, which the filter table sees after DNAT
/// and before SNAT, as a leg of the connection did. Among connections on the same tuple (a
/// reused 4-tuple), the one that started nearest in time.
fn attach_filter<'a>(conns: &mut [Conn<'a>], filter: Vec<&'a Observation>) -> Vec<&'a Observation> {
    if filter.is_empty() {
        return filter;
    }
    let mut by_tuple: HashMap<Tuple, Vec<usize>> = HashMap::default();
    for (i, c) in conns.iter().enumerate() {
        for t in c.client_tuples() {
            by_tuple.entry(t).or_default().push(i);
        }
    }
    // The kernel notes the conntrack entry of what went into the table; what came out of it is
    // the same packet, so its key takes its twin's.
    let before: HashMap<FlowKey, Ct> = filter
        .iter()
        .filter(|o| o.point.filter_passed().is_some())
        .map(|o| (o.key, o.ct))
        .collect();
    let mut unattached = Vec::new();
    for o in filter {
        let ct = match o.ct {
            Ct::Unknown => before_twin(&o.key)
                .and_then(|k| before.get(&k).copied())
                .unwrap_or_default(),
            ct => ct,
        };
        let keys = match ct {
            Ct::Original { tuple, .. } => vec![tuple],
            _ => vec![o.tuple, o.tuple.reversed()],
        };
        let nearest = keys
            .iter()
            .filter_map(|k| by_tuple.get(k))
            .flatten()
            .min_by_key(|&&i| conns[i].first_ns().abs_diff(o.c.first_ns));
        match nearest {
            Some(&i) => conns[i].filter.push(o),
            None => unattached.push(o),
        }
    }
    unattached
}

/// The key just before the filter table of a key just after it.
fn before_twin(k: &FlowKey) -> Option<FlowKey> {
    let point = Point::from_u8(k.point)?;
    let before = [
        Point::FilterForward,
        Point::FilterInput,
        Point::FilterOutput,
    ]
    .into_iter()
    .find(|b| b.filter_passed() == Some(point))?;
    Some(FlowKey {
        point: before as u8,
        ..*k
    })
}

/// One address pair's observations, split into the connections that used it one after the
/// other. Only where the kernel set counters aside (retired keys: a reused 4-tuple) is there more
/// than one; connections on one 4-tuple never overlap in time, so a gap between one's last
/// packet and the next one's first is the boundary.
fn instances(mut obs: Vec<&Observation>) -> Vec<Vec<&Observation>> {
    if !obs.iter().any(|o| o.is_retired()) {
        return vec![obs];
    }
    obs.sort_by_key(|o| o.c.first_ns);
    // Nothing read yet (a live key just emptied for its new connection): no time to place it.
    let (unread, read): (Vec<_>, Vec<_>) = obs.into_iter().partition(|o| o.c.packets == 0);
    let mut out: Vec<Vec<&Observation>> = Vec::new();
    let mut end = 0;
    for o in read {
        match out.last_mut() {
            Some(cur) if o.c.first_ns <= end => cur.push(o),
            _ => out.push(vec![o]),
        }
        end = end.max(o.c.last_ns);
    }
    match out.last_mut() {
        Some(cur) => cur.extend(unread),
        None => out.push(unread),
    }
    out
}

/// Pre-DNAT legs by tuple; several when a client reused its 4-tuple.
#[derive(Default)]
struct PreLegs<'a>(HashMap<Tuple, Vec<Leg<'a>>>);

impl<'a> PreLegs<'a> {
    /// The pre leg of `t` that a post leg starting at `post_start` belongs to: the latest one
    /// that began before it (a packet passes the pod's veth before it leaves the stack) and had
    /// not ended before it. The walk of the flow map may have read the pre leg's keys before a
    /// reuse of the 4-tuple restarted them and the post leg's after: the new connection's post
    /// leg must not take the old one's pre leg (whose own post leg is under retired keys).
    fn take(&mut self, t: &Tuple, post_start: u64) -> Option<Leg<'a>> {
        let legs = self.0.get_mut(t)?;
        let i = (0..legs.len())
            .filter(|&i| legs[i].first_ns() <= post_start)
            .filter(|&i| !(legs[i].ended() && legs[i].last_ns() < post_start))
            .max_by_key(|&i| legs[i].first_ns())?;
        Some(legs.swap_remove(i))
    }
}

/// Pair each post-DNAT leg (left the stack, never entered it) with the pre-DNAT leg (entered,
/// never left) its conntrack entry names; the rest is returned. The pre leg may have entered
/// from the wire: a NodePort reached from outside, DNAT-ed and masqueraded here.
fn pair_by_conntrack(legs: Vec<Leg<'_>>) -> (Vec<Conn<'_>>, Vec<Leg<'_>>) {
    let (pre, others): (Vec<Leg<'_>>, Vec<Leg<'_>>) =
        legs.into_iter().partition(Leg::is_pre_candidate);
    let mut by_tuple = PreLegs::default();
    for l in pre {
        by_tuple.0.entry(l.orig).or_default().push(l);
    }
    let (mut conns, mut rest) = (Vec::new(), Vec::new());
    for leg in others {
        let post_candidate = leg.left_stack() && !leg.entered();
        match leg
            .ct_original()
            .filter(|_| post_candidate)
            .and_then(|t| by_tuple.take(&t, leg.first_ns()))
        {
            Some(p) => conns.push(Conn {
                pre: Some(p),
                post: Some(leg),
                ambiguous: false,
                filter: Vec::new(),
            }),
            None => rest.push(leg),
        }
    }
    rest.extend(by_tuple.0.into_values().flatten());
    (conns, rest)
}
