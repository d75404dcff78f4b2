//! Interface discovery in the agent's network namespace.

use std::ffi::{CStr, CString};

/// ifindex of `name` in this network namespace.
pub fn index_of(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}

/// All interfaces of this network namespace as (ifindex, name). Uses netlink through libc, so it
/// sees the namespace the process is in (a /sys mount might show another one).
pub fn list() -> Vec<(u32, String)> {
    let mut out = Vec::new();
    // SAFETY: if_nameindex returns an array terminated by a zero entry, freed below.
    unsafe {
        let head = libc::if_nameindex();
        if head.is_null() {
            return out;
        }
        let mut p = head;
        while (*p).if_index != 0 && !(*p).if_name.is_null() {
            let name = CStr::from_ptr((*p).if_name).to_string_lossy().into_owned();
            out.push(((*p).if_index, name));
            p = p.add(1);
        }
        libc::if_freenameindex(head);
    }
    out
}

/// Shell-style glob with `*` and `?`.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    fn rec(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => rec(&p[1..], n) || (!n.is_empty() && rec(p, &n[1..])),
            (Some(b'?'), Some(_)) => rec(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => rec(&p[1..], &n[1..]),
            _ => false,
        }
    }
    rec(pattern.as_bytes(), name.as_bytes())
}

const RTF_GATEWAY: u32 = 0x0002;

/// Interfaces that carry a gateway route (the default route, or a route to another node's pod
/// range): in a VPC-native cluster these are the node-to-node wire.
pub fn default_uplinks() -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(v4) = std::fs::read_to_string("/proc/net/route") {
        out.extend(gateway_ifaces_v4(&v4));
    }
    if let Ok(v6) = std::fs::read_to_string("/proc/net/ipv6_route") {
        out.extend(gateway_ifaces_v6(&v6));
    }
    out.sort();
    out.dedup();
    out
}

fn gateway_ifaces_v4(table: &str) -> Vec<String> {
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let flags = u32::from_str_radix(f.get(3)?, 16).ok()?;
            (flags & RTF_GATEWAY != 0).then(|| f[0].to_owned())
        })
        .collect()
}

fn gateway_ifaces_v6(table: &str) -> Vec<String> {
    table
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let flags = u32::from_str_radix(f.get(8)?, 16).ok()?;
            let iface = f.get(9)?;
            (flags & RTF_GATEWAY != 0 && *iface != "lo").then(|| (*iface).to_owned())
        })
        .collect()
}

/// Host routes (/32, /128) through the given interfaces: pod IPs, where the CNI routes each pod
/// to its veth (Calico, GKE, the lab).
pub fn pod_routes(ifaces: &[&str]) -> Vec<(std::net::IpAddr, String)> {
    let v4 = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
    let v6 = std::fs::read_to_string("/proc/net/ipv6_route").unwrap_or_default();
    host_routes(&v4, &v6)
        .into_iter()
        .filter(|(_, i)| ifaces.contains(&i.as_str()))
        .collect()
}

fn host_routes(v4: &str, v6: &str) -> Vec<(std::net::IpAddr, String)> {
    let mut out = Vec::new();
    for l in v4.lines().skip(1) {
        let f: Vec<&str> = l.split_whitespace().collect();
        if let (Some(dst), Some(mask)) = (f.get(1), f.get(7))
            && *mask == "FFFFFFFF"
            && let Ok(d) = u32::from_str_radix(dst, 16)
        {
            // /proc/net/route prints the address in host byte order.
            out.push((
                std::net::Ipv4Addr::from(d.to_le_bytes()).into(),
                f[0].to_owned(),
            ));
        }
    }
    for l in v6.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if let (Some(dst), Some(&"80"), Some(iface)) = (f.first(), f.get(1), f.get(9))
            && let Ok(d) = u128::from_str_radix(dst, 16)
        {
            out.push((std::net::Ipv6Addr::from(d).into(), (*iface).to_owned()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob() {
        assert!(glob_match("veth*", "veth1a2b"));
        assert!(glob_match("cali*", "cali12345"));
        assert!(!glob_match("veth*", "eth0"));
        assert!(glob_match("e?h0", "eth0"));
        assert!(glob_match("*", ""));
        assert!(!glob_match("veth", "veth0"));
    }

    #[test]
    fn gateway_routes() {
        let v4 = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                  eth0\t0002F40A\t0200C80A\t0003\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                  veth1\t0A01F40A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n";
        assert_eq!(gateway_ifaces_v4(v4), vec!["eth0".to_owned()]);
        let v6 = "fd000010024400020000000000000000 40 00000000000000000000000000000000 00 fd000200000000000000000000000002 00000400 00000001 00000000 00000003     eth1\n\
                  fd000010024400010000000000000010 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00000001 veth1\n";
        assert_eq!(gateway_ifaces_v6(v6), vec!["eth1".to_owned()]);
        let hosts = host_routes(v4, v6);
        assert_eq!(
            hosts,
            vec![
                ("10.244.1.10".parse().unwrap(), "veth1".to_owned()),
                ("fd00:10:244:1::10".parse().unwrap(), "veth1".to_owned())
            ]
        );
    }
}
