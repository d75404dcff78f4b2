//! cgroup_skb egress: report the first packet of each remembered socket.

use aya_ebpf::{
    EbpfContext, helpers::bpf_get_socket_cookie, macros::cgroup_skb, programs::SkBuffContext,
};
use observer_common::{SocketEvent, Stat};

use crate::{
    maps::{SOCKET_EVENTS, SOCKS, count},
    parse,
};

const ALLOW: i32 = 1;

#[cgroup_skb(egress)]
pub fn sock_egress(ctx: SkBuffContext) -> i32 {
    report_first_packet(&ctx);
    ALLOW
}

#[inline(always)]
fn report_first_packet(ctx: &SkBuffContext) {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(info) = SOCKS.get_ptr_mut(cookie) else {
        return;
    };
    // SAFETY: pointer into a live map value.
    let info = unsafe { &mut *info };
    if info.reported != 0 {
        return;
    }
    let t = match parse::parse_ip(ctx) {
        Ok(t) => t,
        Err(stat) => {
            count(stat);
            return;
        }
    };
    info.reported = 1;
    let ev = SocketEvent {
        cookie,
        cgroup_id: info.cgroup_id,
        ts_ns: info.ts_ns,
        tgid: info.tgid,
        sport: t.sport,
        dport: t.dport,
        asked_dport: info.asked_dport,
        proto: t.proto,
        family: t.family,
        _pad: [0; 4],
        comm: info.comm,
        src: parse::addr_bytes(t.src),
        dst: parse::addr_bytes(t.dst),
        asked_dst: info.asked_dst,
    };
    if SOCKET_EVENTS.output::<SocketEvent>(&ev, 0).is_err() {
        count(Stat::SocketEventsLost);
    }
}
