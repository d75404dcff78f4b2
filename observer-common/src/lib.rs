//! Types shared by the kernel programs (`observer-ebpf`) and the agent (`observer`).
//!
//! Everything here is `#[repr(C)]`, `Copy`, built from integers only and padded explicitly, so the
//! byte layout is the same on both sides of the map and ring-buffer boundary. The `user` feature
//! adds `aya::Pod` so userspace can read these straight out of maps; the `names` feature adds the
//! static names file's format (std, serde).
#![no_std]

#[cfg(feature = "names")]
extern crate std;

/// The static names file (`--names`), shared by the agent that reads it and the lab that writes it.
#[cfg(feature = "names")]
pub mod names;

/// Where agents pin their flow map by default: `<PIN_ROOT>/<netns name, or host>/<FLOWS_PIN>`.
/// The lab removes what its nodes' agents left there when it goes down.
pub const PIN_ROOT: &str = "/sys/fs/bpf/observer";
/// Where `observer-lab` keeps each lab's state: `<LAB_STATE_ROOT>/<lab>/names.yaml` is its names
/// file, which also says where each node's agent serves /flows (`observer agent --lab`).
pub const LAB_STATE_ROOT: &str = "/run/observer-lab";
/// The pinned flow map's file name in a pin directory (the map's name in the object).
pub const FLOWS_PIN: &str = "FLOWS";
/// The pinned conntrack tuples of the flow keys, beside it.
pub const CT_ORIG_PIN: &str = "CT_ORIG";

/// A flow key no program makes (no such point): an agent that stops in order and leaves its map
/// pinned stores when it stopped under it (`last_ns`), so the next one can say from when to when
/// nothing counted. The next agent takes it out before anything else reads the map.
pub const STOP_MARK_POINT: u8 = 0xff;

/// Where in the node a packet was seen.
///
/// The numbering is part of the kernel/user contract: it is stored in [`FlowKey::point`].
#[repr(u8)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Point {
    /// tc ingress on the host side of a pod veth: the pod's packet entering the node (pre-DNAT).
    PodIngress = 0,
    /// tc egress on the host side of a pod veth: delivery to the pod.
    PodEgress = 1,
    /// tc ingress on a node uplink: arrived from the node-to-node wire.
    UplinkIngress = 2,
    /// tc egress on a node uplink: leaving onto the node-to-node wire (what a VPC firewall sees).
    UplinkEgress = 3,
    /// netfilter FORWARD just before the filter table (priority -1): what filter evaluates for a
    /// routed packet (a pod's, after DNAT, before SNAT).
    FilterForward = 4,
    /// netfilter LOCAL_IN just before the filter table: for a process of the node.
    FilterInput = 5,
    /// netfilter LOCAL_OUT just before the filter table: from a process of the node, after DNAT.
    FilterOutput = 6,
    /// The same three hooks just after the filter table (priority +1): what filter let through.
    FilterForwardPassed = 7,
    FilterInputPassed = 8,
    FilterOutputPassed = 9,
}

impl Point {
    pub const ALL: [Point; 10] = [
        Point::PodIngress,
        Point::PodEgress,
        Point::UplinkIngress,
        Point::UplinkEgress,
        Point::FilterForward,
        Point::FilterInput,
        Point::FilterOutput,
        Point::FilterForwardPassed,
        Point::FilterInputPassed,
        Point::FilterOutputPassed,
    ];

    pub const fn from_u8(v: u8) -> Option<Point> {
        match v {
            0 => Some(Point::PodIngress),
            1 => Some(Point::PodEgress),
            2 => Some(Point::UplinkIngress),
            3 => Some(Point::UplinkEgress),
            4 => Some(Point::FilterForward),
            5 => Some(Point::FilterInput),
            6 => Some(Point::FilterOutput),
            7 => Some(Point::FilterForwardPassed),
            8 => Some(Point::FilterInputPassed),
            9 => Some(Point::FilterOutputPassed),
            _ => None,
        }
    }

    /// The name used in flow records and metric labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            Point::PodIngress => "pod_ingress",
            Point::PodEgress => "pod_egress",
            Point::UplinkIngress => "uplink_ingress",
            Point::UplinkEgress => "uplink_egress",
            Point::FilterForward => "filter_forward",
            Point::FilterInput => "filter_input",
            Point::FilterOutput => "filter_output",
            Point::FilterForwardPassed => "filter_forward_passed",
            Point::FilterInputPassed => "filter_input_passed",
            Point::FilterOutputPassed => "filter_output_passed",
        }
    }

    /// Where the kernel notes the packet's conntrack entry for a new key: where the tuple left
    /// the IP stack, and just before the filter table (after it, the same packet: the agent
    /// takes its twin's).
    pub const fn notes_ct(self) -> bool {
        self.is_egress() || self.filter_passed().is_some()
    }

    /// Seen by a netfilter program around the filter table (before or after it).
    pub const fn is_filter(self) -> bool {
        self as u8 >= Point::FilterForward as u8
    }

    /// The point just after the filter table at the same hook as this one just before it.
    pub const fn filter_passed(self) -> Option<Point> {
        match self {
            Point::FilterForward => Some(Point::FilterForwardPassed),
            Point::FilterInput => Some(Point::FilterInputPassed),
            Point::FilterOutput => Some(Point::FilterOutputPassed),
            _ => None,
        }
    }

    /// The netfilter hook of a filter point: `forward`, `input` or `output`.
    pub const fn filter_hook(self) -> Option<&'static str> {
        match self {
            Point::FilterForward | Point::FilterForwardPassed => Some("forward"),
            Point::FilterInput | Point::FilterInputPassed => Some("input"),
            Point::FilterOutput | Point::FilterOutputPassed => Some("output"),
            _ => None,
        }
    }

    /// True for the points where a packet leaves the node's IP stack (after netfilter).
    pub const fn is_egress(self) -> bool {
        matches!(self, Point::PodEgress | Point::UplinkEgress)
    }
}

pub const AF_INET: u8 = 4;
pub const AF_INET6: u8 = 6;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// [`FlowCounters::marks`] bit: a TCP SYN without ACK was seen, i.e. this direction opened the
/// connection. The kernel sets it because OR-ed TCP flags cannot tell SYN from SYN-ACK.
pub const MARK_SYN_ONLY: u8 = 0x01;

/// Identity of one direction of one flow at one observation point on one interface.
///
/// Addresses are in network byte order; an IPv4 address fills the first four bytes and the rest
/// are zero. Ports are in host byte order (zero for protocols without ports).
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub ifindex: u32,
    pub proto: u8,
    pub family: u8,
    pub point: u8,
    /// 0 for the key's live entry; 1..=[`RETIRED_SLOTS`] for the counters of an earlier
    /// connection on the same 4-tuple, set aside by the kernel when a new SYN reused it after FIN
    /// or RST.
    pub retired: u8,
}

/// Earlier connections of one key the kernel can hold apart until userspace takes them (a
/// client reusing its source port faster than connections are finished shares the last slot).
pub const RETIRED_SLOTS: u8 = 8;

/// Counters aggregated in the kernel for one [`FlowKey`], one copy per CPU.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowCounters {
    pub packets: u64,
    pub bytes: u64,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) of the first and last packet on this CPU.
    pub first_ns: u64,
    pub last_ns: u64,
    /// TCP flags OR-ed over all packets.
    pub tcp_flags: u8,
    /// `MARK_*` bits.
    pub marks: u8,
    // Two words rather than `[u8; 6]`: zeroing a byte array made the kernel program call a
    // memset subprogram on every new key.
    pub _pad: u16,
    pub _pad2: u32,
}

impl FlowCounters {
    /// Add another CPU's copy (or another part of the same flow): sums, the earliest start that
    /// is set, the latest end, OR-ed flags. How userspace and the kernel both sum per-CPU copies.
    #[inline(always)]
    pub fn merge(&mut self, o: &FlowCounters) {
        self.packets += o.packets;
        self.bytes += o.bytes;
        if o.first_ns != 0 && (self.first_ns == 0 || o.first_ns < self.first_ns) {
            self.first_ns = o.first_ns;
        }
        if o.last_ns > self.last_ns {
            self.last_ns = o.last_ns;
        }
        self.tcp_flags |= o.tcp_flags;
        self.marks |= o.marks;
    }
}

/// The conntrack entry attached to a packet at an egress point, read once per new flow key:
/// its ORIGINAL tuple (what the client sent, before any NAT). Comparing it with the observed
/// tuple says what netfilter NAT rewrote (kernel `include/net/netfilter/nf_conntrack_tuple.h`,
/// `skb->_nfct`; the low 3 bits are `enum ip_conntrack_info`).
// Aligned to 8 (same size and offsets) so the kernel zeroes and copies it a word at a time: at
// alignment 1 the compiler called a memset subprogram for it on every new egress key.
#[repr(C, align(8))]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct CtOrig {
    /// Addresses as conntrack stores them (IPv4 in the first 4 bytes).
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Ports in network byte order, as conntrack stores them (0 without ports).
    pub sport_be: u16,
    pub dport_be: u16,
    /// `enum ip_conntrack_info`; `CT_UNTRACKED` when the packet is not tracked.
    pub ctinfo: u8,
    pub _pad: u8,
    /// The entry's conntrack zone (`nf_conn.zone.id`; 0 is the default zone).
    pub zone: u16,
}

/// `IP_CT_UNTRACKED` (kernel `include/uapi/linux/netfilter/nf_conntrack_common.h`).
pub const CT_UNTRACKED: u8 = 7;
/// Entries of the kernel's CT_ORIG map for a flow map of `max_flows`: at most every other key
/// notes a conntrack tuple (the egress and "before the filter table" points). A plain hash, not
/// LRU (an LRU insert's slow path made a new egress key's p99 ten times the median); userspace
/// deletes an entry with its key, and a full map is counted ([`Stat::CtOrigFull`]).
pub const fn ct_orig_entries(max_flows: u32) -> u32 {
    max_flows / 2
}
pub const CT_ORIG_MAX_ENTRIES: u32 = ct_orig_entries(FLOWS_MAX_ENTRIES);

/// Per-socket state kept by the cgroup hooks, keyed by socket cookie.
#[repr(C)]
#[derive(Copy, Clone, Debug)]
pub struct SockInfo {
    pub cgroup_id: u64,
    pub ts_ns: u64,
    pub tgid: u32,
    pub asked_dport: u16,
    pub family: u8,
    /// 1 once the socket's first packet has been reported.
    pub reported: u8,
    pub comm: [u8; 16],
    pub asked_dst: [u8; 16],
}

/// Ring-buffer event: the first packet a socket sent, with the process that asked for it.
///
/// `src`/`dst` are the packet as the socket emitted it (inside the pod, before any node DNAT);
/// `asked_dst` is what the application passed to connect()/sendmsg().
#[repr(C)]
#[derive(Copy, Clone, Debug)]
pub struct SocketEvent {
    pub cookie: u64,
    pub cgroup_id: u64,
    pub ts_ns: u64,
    pub tgid: u32,
    pub sport: u16,
    pub dport: u16,
    pub asked_dport: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 4],
    pub comm: [u8; 16],
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub asked_dst: [u8; 16],
}

/// Ring-buffer event: the kernel freed a packet of this node's network namespace with a drop
/// reason (`tp_btf/kfree_skb`).
#[repr(C)]
#[derive(Copy, Clone, Debug)]
pub struct DropEvent {
    pub ts_ns: u64,
    /// Kernel address of the caller that dropped it (symbolised in userspace).
    pub location: u64,
    /// `enum skb_drop_reason` value; names come from the kernel's BTF.
    pub reason: u32,
    /// Device the packet was on when dropped.
    pub ifindex: u32,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// Indexes of the per-CPU `STATS` array: everything the kernel side skipped or could not deliver.
#[repr(u32)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Stat {
    // 0 counted lost "new flow key" events, whose ring is gone: userspace reads the whole flow
    // map every poll. Left unused so the other indexes keep their meaning.
    /// A [`SocketEvent`] did not fit in the ring buffer.
    SocketEventsLost = 1,
    /// A new flow could not be inserted: the flow map is full.
    FlowMapFull = 2,
    /// A socket could not be remembered: the socket map update failed.
    SockMapFull = 3,
    /// Packet too short for the headers it announces.
    Truncated = 4,
    /// Malformed header (bad IHL, bad extension-header length).
    Malformed = 5,
    /// Not IPv4/IPv6 (ARP, LLDP, ...): not tracked.
    NonIp = 6,
    /// Non-first IP fragment: tracked without ports.
    Fragment = 7,
    /// ICMP/ICMPv6 packets (tracked without ports).
    Icmp = 8,
    /// Other L4 protocols (tracked without ports).
    OtherL4 = 9,
    /// A [`DropEvent`] did not fit in the ring buffer.
    DropEventsLost = 10,
    /// A SYN reused the 4-tuple of an ended connection still in the flow map: the old counters
    /// were set aside under a retired key, the new connection starts from zero.
    TupleReused = 11,
    /// As `TupleReused`, but every retired slot still held an unfinished earlier connection: the
    /// old connection's counters were added to the last one (one record for both).
    TupleReuseMerged = 12,
    /// A netfilter program could not read the packet or its device from kernel memory.
    KernelRead = 13,
    /// A new key's conntrack tuple could not be noted: that map is full. The key's record then
    /// says its translation was inferred.
    CtOrigFull = 14,
    /// An IPv6 extension-header chain longer than the programs follow (4 headers): not tracked,
    /// since its transport protocol and ports are unknown.
    ExtHeaders = 15,
}

pub const STATS_LEN: u32 = 16;

impl Stat {
    pub const ALL: [Stat; STATS_LEN as usize - 1] = [
        Stat::SocketEventsLost,
        Stat::FlowMapFull,
        Stat::SockMapFull,
        Stat::Truncated,
        Stat::Malformed,
        Stat::NonIp,
        Stat::Fragment,
        Stat::Icmp,
        Stat::OtherL4,
        Stat::DropEventsLost,
        Stat::TupleReused,
        Stat::TupleReuseMerged,
        Stat::KernelRead,
        Stat::CtOrigFull,
        Stat::ExtHeaders,
    ];
}

/// Default map sizes; the agent can override them at load time.
pub const FLOWS_MAX_ENTRIES: u32 = 65_536;
pub const SOCKS_MAX_ENTRIES: u32 = 16_384;
pub const SOCKET_EVENTS_BYTES: u32 = 256 * 1024;
pub const DROP_EVENTS_BYTES: u32 = 64 * 1024;

// Layout checks: a size change here is a kernel/user ABI change.
const _: () = assert!(core::mem::size_of::<FlowKey>() == 44);
const _: () = assert!(core::mem::size_of::<FlowCounters>() == 40);
const _: () = assert!(core::mem::size_of::<CtOrig>() == 40);
const _: () = assert!(core::mem::size_of::<SockInfo>() == 56);
const _: () = assert!(core::mem::size_of::<SocketEvent>() == 104);
const _: () = assert!(core::mem::size_of::<DropEvent>() == 64);

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: plain-old-data, repr(C), explicit padding, every bit pattern valid.
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowCounters {}
    unsafe impl aya::Pod for CtOrig {}
    unsafe impl aya::Pod for SockInfo {}
}
