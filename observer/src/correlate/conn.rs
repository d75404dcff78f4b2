//! Grouping kernel observations into connections.
//!
//! An observation is one direction of one tuple at one point. Observations of the same address
//! pair form a *leg*; a DNAT-ed connection has two legs on the sending node that share the client
//! endpoint: the pre-DNAT leg (seen entering from the pod) and the post-DNAT leg (seen leaving the
//! IP stack). The client endpoint (pod IP and source port) is what conntrack keeps unchanged
//! across DNAT, so it is the join key.

use std::collections::HashMap;

use observer_common::{FlowKey, MARK_SYN_ONLY, Point};

use super::tuple::{Endpoint, Tuple};

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
}

/// What the kernel said of an egress observation's conntrack entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Ct {
    /// Not read (yet), or not readable here.
    #[default]
    Unknown,
    Untracked,
    /// The ORIGINAL direction's tuple: what the client sent before any NAT.
    Original(Tuple),
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

    /// What conntrack says the client sent, where this leg's own direction left the stack.
    fn ct_original(&self) -> Option<Tuple> {
        self.obs.iter().find_map(|o| match o.ct {
            Ct::Original(t) if self.is_orig(o) && o.point.is_egress() => Some(t),
            _ => None,
        })
    }

    fn is_pre_candidate(&self) -> bool {
        self.sent_by_local_pod() && !self.left_stack()
    }
}

/// A connection as seen on this node: one leg, or a pre-DNAT leg and a post-DNAT leg.
#[derive(Debug)]
pub struct Conn<'a> {
    pub pre: Option<Leg<'a>>,
    pub post: Option<Leg<'a>>,
    /// The pairing had more than one candidate (see [`group`]).
    pub ambiguous: bool,
}

impl<'a> Conn<'a> {
    pub fn legs(&self) -> impl Iterator<Item = &Leg<'a>> {
        self.pre.iter().chain(self.post.iter())
    }

    /// Stable identity across polls: the client endpoint, plus the server for port-less
    /// protocols.
    pub fn id(&self) -> ConnId {
        let leg = self.pre.as_ref().or(self.post.as_ref()).expect("non-empty");
        conn_id(&leg.orig)
    }

    pub fn last_ns(&self) -> u64 {
        self.legs().map(Leg::last_ns).max().unwrap_or(0)
    }

    pub fn first_ns(&self) -> u64 {
        self.legs().map(Leg::first_ns).min().unwrap_or(0)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnId {
    pub proto: u8,
    pub client: Endpoint,
    pub server: Option<Endpoint>,
}

fn conn_id(orig: &Tuple) -> ConnId {
    ConnId {
        proto: orig.proto,
        client: orig.src,
        server: (!orig.has_ports()).then_some(orig.dst),
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
pub fn group(observations: &[Observation]) -> Vec<Conn<'_>> {
    let mut legs: HashMap<LegKey, Vec<&Observation>> = HashMap::new();
    for o in observations {
        legs.entry(leg_key(&o.tuple)).or_default().push(o);
    }
    let (mut conns, rest) = pair_by_conntrack(legs.into_values().map(orient).collect());
    let mut by_client: HashMap<ConnId, Vec<Leg<'_>>> = HashMap::new();
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
            });
        }
        for q in post {
            conns.push(Conn {
                pre: None,
                post: Some(q),
                ambiguous,
            });
        }
        for w in whole {
            // A single leg is both views: put it where the record builder looks first.
            conns.push(Conn {
                pre: None,
                post: Some(w),
                ambiguous: false,
            });
        }
    }
    conns
}

/// Pair each post-DNAT leg with the pre-DNAT leg its conntrack entry names; the rest is returned.
fn pair_by_conntrack(legs: Vec<Leg<'_>>) -> (Vec<Conn<'_>>, Vec<Leg<'_>>) {
    let (pre, others): (Vec<Leg<'_>>, Vec<Leg<'_>>) =
        legs.into_iter().partition(Leg::is_pre_candidate);
    let mut pre: HashMap<Tuple, Leg<'_>> = pre.into_iter().map(|l| (l.orig, l)).collect();
    let (mut conns, mut rest) = (Vec::new(), Vec::new());
    for leg in others {
        let post_candidate = leg.left_stack() && !leg.sent_by_local_pod();
        match leg
            .ct_original()
            .filter(|_| post_candidate)
            .and_then(|t| pre.remove(&t))
        {
            Some(p) => conns.push(Conn {
                pre: Some(p),
                post: Some(leg),
                ambiguous: false,
            }),
            None => rest.push(leg),
        }
    }
    rest.extend(pre.into_values());
    (conns, rest)
}
