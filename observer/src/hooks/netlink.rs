//! The interfaces of this network namespace with what `if_nameindex` does not say: their kind
//! and whether their peer lives in another namespace (IFLA_LINK_NETNSID), read with one
//! RTM_GETLINK dump over rtnetlink (include/uapi/linux/if_link.h, rtnetlink(7)).

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

/// One interface as rtnetlink describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `veth`, `bridge`, `vxlan`, ...; None for a physical device.
    pub kind: Option<String>,
    /// The other end (a veth's peer) is in another network namespace: a pod's interface.
    pub peer_elsewhere: bool,
}

const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_LINK_NETNSID: u16 = 37;
const NLMSG_HDR: usize = 16;
const IFINFOMSG: usize = 16;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// (type, payload) of each attribute in `b`; the nested and byte-order flags are masked off.
fn attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while let (Some(len), Some(ty)) = (u16_at(b, 0), u16_at(b, 2)) {
        let len = len as usize;
        if len < 4 || len > b.len() {
            break;
        }
        out.push((ty & 0x3fff, &b[4..len]));
        b = &b[align4(len).min(b.len())..];
    }
    out
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// The link an RTM_NEWLINK payload (ifinfomsg and attributes) describes.
fn parse_link(payload: &[u8]) -> Option<Link> {
    let index = u32_at(payload, 4)?;
    let mut link = Link {
        index,
        name: String::new(),
        kind: None,
        peer_elsewhere: false,
    };
    for (ty, data) in attrs(payload.get(IFINFOMSG..)?) {
        match ty {
            IFLA_IFNAME => link.name = cstr(data),
            IFLA_LINK_NETNSID => link.peer_elsewhere = true,
            IFLA_LINKINFO => {
                link.kind = attrs(data)
                    .into_iter()
                    .find(|(t, _)| *t == IFLA_INFO_KIND)
                    .map(|(_, k)| cstr(k));
            }
            _ => {}
        }
    }
    Some(link)
}

/// Every interface of the namespace the calling thread is in.
pub fn links() -> std::io::Result<Vec<Link>> {
    // SAFETY: plain socket(2); the fd is owned below.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut req = [0u8; NLMSG_HDR + IFINFOMSG];
    req[0..4].copy_from_slice(&((NLMSG_HDR + IFINFOMSG) as u32).to_ne_bytes());
    req[4..6].copy_from_slice(&RTM_GETLINK.to_ne_bytes());
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    req[6..8].copy_from_slice(&flags.to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes());
    // SAFETY: sending our buffer on our socket (to the kernel: no address needed).
    if unsafe { libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        // SAFETY: receiving into our buffer.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut b = &buf[..n as usize];
        while let (Some(len), Some(ty)) = (u32_at(b, 0), u16_at(b, 4)) {
            let len = len as usize;
            if len < NLMSG_HDR || len > b.len() {
                break;
            }
            match ty {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    let errno = u32_at(b, NLMSG_HDR).map_or(0, |e| -(e as i32));
                    return Err(std::io::Error::from_raw_os_error(errno));
                }
                RTM_NEWLINK => out.extend(parse_link(&b[NLMSG_HDR..len])),
                _ => {}
            }
            b = &b[align4(len).min(b.len())..];
        }
        if n == 0 {
            return Ok(out);
        }
    }
}

/// Link notifications (rtnetlink group RTMGRP_LINK) of this network namespace: a veth created or
/// moved into a pod's namespace is announced at once, so the follower attaches to it before the
/// pod's first packets instead of at its next scan.
pub struct LinkEvents {
    fd: tokio::io::unix::AsyncFd<OwnedFd>,
}

impl LinkEvents {
    /// Subscribe; needs a tokio runtime.
    pub fn subscribe() -> std::io::Result<LinkEvents> {
        // SAFETY: plain socket(2); the fd is owned below.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::NETLINK_ROUTE,
            )
        };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: an all-zero sockaddr_nl is valid; its fields are set below.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        addr.nl_groups = libc::RTMGRP_LINK as u32;
        // SAFETY: binding our socket to an address we own, of its size.
        let bound = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if bound < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the OwnedFd is a valid open socket that the AsyncFd owns from here on.
        let fd = unsafe { tokio::io::unix::AsyncFd::register(fd) }.map_err(std::io::Error::from)?;
        Ok(LinkEvents { fd })
    }

    /// Wait for at least one notification and take every one queued (their content does not
    /// matter: the follower reads the whole table again). A queue that overflowed (ENOBUFS)
    /// counts as a change too.
    pub async fn changed(&self) -> std::io::Result<()> {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let mut ready = self.fd.readable().await?;
            let mut got = false;
            loop {
                // SAFETY: receiving into our buffer on our socket.
                let n = unsafe {
                    libc::recv(
                        self.fd.get_ref().as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        0,
                    )
                };
                if n >= 0 {
                    got = true;
                    continue;
                }
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN) => break,
                    Some(libc::ENOBUFS) => got = true,
                    Some(libc::EINTR) => {}
                    _ => return Err(e),
                }
            }
            ready.clear_ready();
            if got {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_namespaces_links_are_listed_with_their_kind() {
        let links = links().unwrap();
        let lo = links.iter().find(|l| l.name == "lo").expect("lo");
        assert_eq!((lo.index, &lo.kind, lo.peer_elsewhere), (1, &None, false));
        // The same names and indexes as if_nameindex(3).
        let mut a: Vec<_> = links.iter().map(|l| (l.index, l.name.clone())).collect();
        let mut b = super::super::ifaces::list();
        a.sort();
        b.sort();
        assert_eq!(a, b);
    }

    #[test]
    fn a_veth_with_its_peer_elsewhere() {
        // ifinfomsg (index 7), IFLA_IFNAME "cali1", IFLA_LINKINFO {IFLA_INFO_KIND "veth"},
        // IFLA_LINK_NETNSID 0.
        let mut p = vec![0u8; 16];
        p[4..8].copy_from_slice(&7u32.to_ne_bytes());
        let attr = |ty: u16, data: &[u8]| {
            let mut a = ((4 + data.len()) as u16).to_ne_bytes().to_vec();
            a.extend_from_slice(&ty.to_ne_bytes());
            a.extend_from_slice(data);
            a.resize(align4(a.len()), 0);
            a
        };
        p.extend(attr(IFLA_IFNAME, b"cali1\0"));
        p.extend(attr(
            IFLA_LINKINFO | 0x8000,
            &attr(IFLA_INFO_KIND, b"veth\0"),
        ));
        p.extend(attr(IFLA_LINK_NETNSID, &0i32.to_ne_bytes()));
        assert_eq!(
            parse_link(&p).unwrap(),
            Link {
                index: 7,
                name: "cali1".into(),
                kind: Some("veth".into()),
                peer_elsewhere: true
            }
        );
    }
}
