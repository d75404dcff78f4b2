//! Filters on a record's own fields, as `hubble observe` combines them: the values of one flag
//! are alternatives (any may match), different flags must all match, and a value written
//! `!VALUE` excludes what it matches.

use std::{net::IpAddr, time::SystemTime};

use anyhow::{Context as _, bail};

use crate::record::{FlowRecord, TupleView};

/// One flag's values: wanted (any of) and excluded (none of).
#[derive(Clone, Debug)]
pub struct Values<T> {
    any: Vec<T>,
    none: Vec<T>,
}

impl<T> Default for Values<T> {
    fn default() -> Self {
        Values {
            any: vec![],
            none: vec![],
        }
    }
}

impl<T> Values<T> {
    fn parse(raw: &[String], f: impl Fn(&str) -> anyhow::Result<T>) -> anyhow::Result<Values<T>> {
        let mut v = Values::default();
        for r in raw {
            match r.strip_prefix('!') {
                Some(neg) => v.none.push(f(neg.trim())?),
                None => v.any.push(f(r.trim())?),
            }
        }
        Ok(v)
    }

    fn admits(&self, matches: impl Fn(&T) -> bool) -> bool {
        (self.any.is_empty() || self.any.iter().any(&matches)) && !self.none.iter().any(matches)
    }
}

/// An address or a range, `10.244.0.0/16` or `fd00::/48`.
#[derive(Clone, Debug, PartialEq)]
pub struct Cidr {
    net: IpAddr,
    len: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> anyhow::Result<Cidr> {
        let (ip, len) = s.split_once('/').unwrap_or((s, ""));
        let net: IpAddr = ip
            .trim_matches(['[', ']'])
            .parse()
            .with_context(|| format!("{s:?}: not an IP address or CIDR"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let len = if len.is_empty() {
            max
        } else {
            len.parse()
                .ok()
                .filter(|l| *l <= max)
                .with_context(|| format!("{s:?}: the prefix length must be 0..={max}"))?
        };
        Ok(Cidr { net, len })
    }

    pub fn contains(&self, ip: &str) -> bool {
        let (a, n, width) = match (ip.parse::<IpAddr>(), self.net) {
            (Ok(IpAddr::V4(a)), IpAddr::V4(n)) => (u32::from(a) as u128, u32::from(n) as u128, 32),
            (Ok(IpAddr::V6(a)), IpAddr::V6(n)) => (u128::from(a), u128::from(n), 128),
            _ => return false,
        };
        let shift = width - u32::from(self.len);
        shift >= 128 || a >> shift == n >> shift
    }
}

/// A pod or Service by name: `NAME` in any namespace, or `NAMESPACE/NAME`.
#[derive(Clone, Debug)]
pub struct Named {
    namespace: Option<String>,
    name: String,
}

impl Named {
    fn parse(s: &str) -> anyhow::Result<Named> {
        if s.is_empty() {
            bail!("an empty name");
        }
        Ok(match s.split_once('/') {
            Some((ns, name)) => Named {
                namespace: Some(ns.to_owned()),
                name: name.to_owned(),
            },
            None => Named {
                namespace: None,
                name: s.to_owned(),
            },
        })
    }

    fn is(&self, namespace: &str, name: &str) -> bool {
        self.name == name && self.namespace.as_deref().is_none_or(|n| n == namespace)
    }
}

/// A Service by name, or by the address a client asked for (`VIP`, `VIP:PORT`, `[V6]:PORT`).
#[derive(Clone, Debug)]
pub enum ServiceSel {
    Named(Named),
    Vip(IpAddr, Option<u16>),
}

impl ServiceSel {
    fn parse(s: &str) -> anyhow::Result<ServiceSel> {
        if let Ok(ip) = s.trim_matches(['[', ']']).parse::<IpAddr>() {
            return Ok(ServiceSel::Vip(ip, None));
        }
        if let Ok(sa) = s.parse::<std::net::SocketAddr>() {
            return Ok(ServiceSel::Vip(sa.ip(), Some(sa.port())));
        }
        Named::parse(s).map(ServiceSel::Named)
    }

    fn matches(&self, r: &FlowRecord) -> bool {
        match self {
            ServiceSel::Named(n) => r
                .service
                .as_ref()
                .is_some_and(|s| n.is(&s.namespace, &s.name)),
            ServiceSel::Vip(ip, port) => {
                let asked = [r.pre_dnat.as_ref(), r.socket.as_ref().map(|s| &s.asked)];
                asked.into_iter().flatten().any(|t| {
                    t.dst.parse::<IpAddr>().is_ok_and(|d| d == *ip)
                        && port.is_none_or(|p| p == t.dport)
                })
            }
        }
    }
}

/// What the user selected; built from [`super::ObserveArgs`].
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub namespace: Values<String>,
    pub pod: Values<Named>,
    pub service: Values<ServiceSel>,
    pub node: Values<String>,
    pub ip: Values<Cidr>,
    pub port: Values<u16>,
    pub protocol: Values<String>,
    pub observed_as: Values<String>,
    pub last_seen: Values<String>,
    pub drop_reason: Values<String>,
    pub verdict: Values<String>,
    pub translated: Option<bool>,
    pub since: Option<SystemTime>,
    pub until: Option<SystemTime>,
}

pub const VERDICTS: &[&str] = &["forwarded", "dropped", "open"];
pub const OBSERVED_AS: &[&str] = &["sender", "receiver", "local", "transit"];

/// `--since`/`--until`: RFC 3339 (`2026-12-02T13:00:00Z`) or a duration ago (`5m`).
pub fn parse_time(s: &str, now: SystemTime) -> anyhow::Result<SystemTime> {
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Ok(t);
    }
    let ago = humantime::parse_duration(s).with_context(|| {
        format!("{s:?}: neither a time (2026-12-02T13:00:00Z) nor a duration ago (5m)")
    })?;
    Ok(now - ago)
}

fn one_of(what: &str, allowed: &[&str], v: &str) -> anyhow::Result<String> {
    let v = v.to_ascii_lowercase();
    if allowed.contains(&v.as_str()) {
        Ok(v)
    } else {
        bail!("{what} {v:?}: one of {}", allowed.join(", "))
    }
}

impl Filter {
    pub fn from_args(a: &super::args::FilterArgs, now: SystemTime) -> anyhow::Result<Filter> {
        let text = |s: &str| Ok(s.to_owned());
        Ok(Filter {
            namespace: Values::parse(&a.namespace, text)?,
            pod: Values::parse(&a.pod, Named::parse)?,
            service: Values::parse(&a.service, ServiceSel::parse)?,
            node: Values::parse(&a.node, text)?,
            ip: Values::parse(&a.ip, Cidr::parse)?,
            port: Values::parse(&a.port, |s| {
                s.parse()
                    .with_context(|| format!("port {s:?}: not 0..=65535"))
            })?,
            protocol: Values::parse(&a.protocol, |s| Ok(s.to_ascii_uppercase()))?,
            observed_as: Values::parse(&a.observed_as, |s| {
                one_of("--observed-as", OBSERVED_AS, s)
            })?,
            last_seen: Values::parse(&a.last_seen, text)?,
            drop_reason: Values::parse(&a.drop_reason, |s| Ok(s.to_ascii_uppercase()))?,
            verdict: Values::parse(&a.verdict, |s| one_of("--verdict", VERDICTS, s))?,
            translated: a.translated,
            since: a.since.as_deref().map(|s| parse_time(s, now)).transpose()?,
            until: a.until.as_deref().map(|s| parse_time(s, now)).transpose()?,
        })
    }

    pub fn matches(&self, r: &FlowRecord) -> bool {
        let pods = || {
            [r.src_pod.as_ref(), r.dst_pod.as_ref()]
                .into_iter()
                .flatten()
        };
        let tuples = || {
            [
                r.pre_dnat.as_ref(),
                r.post_dnat.as_ref(),
                r.wire_view.as_ref(),
                r.backend_tuple(),
            ]
            .into_iter()
            .flatten()
        };
        let in_time = || {
            let t = humantime::parse_rfc3339_weak(&r.time).ok();
            self.since.is_none_or(|s| t.is_some_and(|t| t >= s))
                && self.until.is_none_or(|u| t.is_some_and(|t| t <= u))
        };
        self.namespace.admits(|ns| {
            pods().any(|p| &p.namespace == ns)
                || r.service.as_ref().is_some_and(|s| &s.namespace == ns)
        }) && self
            .pod
            .admits(|n| pods().any(|p| n.is(&p.namespace, &p.name)))
            && self.service.admits(|s| s.matches(r))
            && self.node.admits(|n| &r.node == n)
            && self
                .ip
                .admits(|c| tuples().any(|t| c.contains(&t.src) || c.contains(&t.dst)))
            && self
                .port
                .admits(|p| tuples().any(|t: &TupleView| t.sport == *p || t.dport == *p))
            && self.protocol.admits(|p| r.proto.eq_ignore_ascii_case(p))
            && self.observed_as.admits(|o| r.observed_as.as_str() == o)
            && self.last_seen.admits(|p| &r.last_seen.point == p)
            && self.drop_reason.admits(|d| {
                r.drop
                    .as_ref()
                    .is_some_and(|x| x.reason.eq_ignore_ascii_case(d))
            })
            && self.verdict.admits(|v| verdict(r) == v)
            && self.translated.is_none_or(|t| r.translated == t)
            && in_time()
    }
}

/// `dropped` if the kernel dropped any of its packets here, else `open` while it lasts, else
/// `forwarded`.
pub fn verdict(r: &FlowRecord) -> &'static str {
    if r.drop.is_some() {
        "dropped"
    } else if !r.is_final {
        "open"
    } else {
        "forwarded"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        let c = Cidr::parse("10.244.0.0/16").unwrap();
        assert!(c.contains("10.244.2.10") && !c.contains("10.245.0.1") && !c.contains("fd00::1"));
        assert!(Cidr::parse("10.0.0.1").unwrap().contains("10.0.0.1"));
        assert!(!Cidr::parse("10.0.0.1").unwrap().contains("10.0.0.2"));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains("192.0.2.1"));
        let v6 = Cidr::parse("fd00:10:244::/48").unwrap();
        assert!(v6.contains("fd00:10:244:2::10") && !v6.contains("fd00:10:245::1"));
        assert!(Cidr::parse("10.0.0.0/33").is_err() && Cidr::parse("web").is_err());
    }

    #[test]
    fn values_any_of_and_none_of() {
        let v =
            Values::parse(&["a".into(), "b".into(), "!c".into()], |s| Ok(s.to_owned())).unwrap();
        assert!(v.admits(|x| x == "a"));
        assert!(!v.admits(|x| x == "z"));
        let only_not = Values::parse(&["!c".into()], |s| Ok(s.to_owned())).unwrap();
        assert!(only_not.admits(|x| x == "z") && !only_not.admits(|x| x == "c"));
    }

    #[test]
    fn times() {
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1000);
        assert_eq!(
            parse_time("5m", now).unwrap(),
            SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(700)
        );
        assert!(parse_time("2026-12-02T13:00:00Z", now).is_ok());
        assert!(parse_time("yesterday", now).is_err());
    }
}
