//! Who the client is when a load balancer stands between it and us.
//!
//! Per-source limits and penalties need the bank's address, not the load balancer's. Two ways
//! to learn it are believed, and only from `server.trusted_proxies`: a PROXY protocol header at
//! the start of the connection (`proxy_protocol.rs`), or, with `server.forwarded_for`, the
//! `X-Forwarded-For` header of each request. Anything else is the connection's own address: a
//! header from anywhere else is the client's word about itself.

use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;

/// An address block such as `10.0.0.0/8` or `2001:db8::/32`; a bare address is a /32 or /128.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `ADDR` or `ADDR/PREFIX`; host bits must be zero (a typo such as `10.1.2.3/8`
    /// usually means the operator meant something else).
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let net: IpAddr = addr.trim().parse().map_err(|_| format!("invalid address {addr:?}"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.trim().parse::<u8>() {
                Ok(p) if p <= max => p,
                _ => return Err(format!("invalid prefix length {p:?} (0 to {max})")),
            },
        };
        let cidr = Cidr { net, prefix };
        if cidr.masked(net) != bits(net) {
            return Err(format!("{s:?} has host bits set; the block is {}/{prefix}", cidr.network()));
        }
        Ok(cidr)
    }

    /// Whether `ip` is inside this block (an IPv4-mapped IPv6 address counts as its IPv4 one).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        if ip.is_ipv4() != self.net.is_ipv4() {
            return false;
        }
        self.masked(ip) == bits(self.net)
    }

    fn masked(&self, ip: IpAddr) -> u128 {
        let width = if ip.is_ipv4() { 32 } else { 128 };
        let host_bits = width - u32::from(self.prefix);
        let mask = if host_bits >= 128 { 0 } else { (!0u128) << host_bits };
        bits(ip) & mask
    }

    fn network(&self) -> IpAddr {
        let m = self.masked(self.net);
        match self.net {
            IpAddr::V4(_) => IpAddr::from((m as u32).to_be_bytes()),
            IpAddr::V6(_) => IpAddr::from(m.to_be_bytes()),
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

fn bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// `::ffff:a.b.c.d` as `a.b.c.d`, so that one source is one key on dual-stack listeners.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// `server.trusted_proxies`, and what is believed from them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies {
    pub blocks: Vec<Cidr>,
    /// `server.forwarded_for`: believe their `X-Forwarded-For`.
    pub forwarded_for: bool,
}

impl TrustedProxies {
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.blocks.iter().any(|c| c.contains(ip))
    }

    /// The address a request comes from: `X-Forwarded-For` read from the right, skipping our own
    /// trusted proxies, when the connection comes from one of them and `forwarded_for` is on;
    /// otherwise the connection's client address. A malformed entry stops the walk at the last
    /// trusted hop (the header is then only as good as the proxy that appended to it).
    pub fn source(&self, client: IpAddr, headers: &HeaderMap) -> IpAddr {
        let client = canonical(client);
        if !self.forwarded_for || !self.contains(client) {
            return client;
        }
        let mut source = client;
        // Each proxy appends: the rightmost entries are the nearest hops. Several header lines
        // are one list, in order.
        let hops = headers.get_all("x-forwarded-for").iter().rev().flat_map(|v| {
            let list = v.to_str().unwrap_or("");
            list.rsplit(',').map(str::trim).collect::<Vec<_>>()
        });
        for hop in hops {
            let Some(ip) = parse_hop(hop) else { break };
            source = canonical(ip);
            if !self.contains(source) {
                break;
            }
        }
        source
    }
}

/// An `X-Forwarded-For` entry: an address, optionally with a port (`1.2.3.4:5`, `[::1]:5`).
fn parse_hop(s: &str) -> Option<IpAddr> {
    s.parse::<IpAddr>().ok().or_else(|| s.parse::<SocketAddr>().ok().map(|a| a.ip()))
}

/// The addresses of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr {
    /// The TCP peer: the bank itself, or the load balancer in front of it.
    pub peer: SocketAddr,
    /// The client as far as the connection tells: the PROXY header's source when a trusted
    /// proxy sent one, else `peer`.
    pub client: SocketAddr,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn blocks_parse_and_match_and_typos_are_refused() {
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains(ip("10.200.1.1")) && c.contains(ip("::ffff:10.0.0.1")) && !c.contains(ip("11.0.0.1")));
        assert!(Cidr::parse("2001:db8::/32").unwrap().contains(ip("2001:db8:ffff::1")));
        assert!(Cidr::parse("192.0.2.7").unwrap().contains(ip("192.0.2.7")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        assert!(Cidr::parse("10.1.2.3/8").unwrap_err().contains("host bits"));
        assert!(Cidr::parse("10.0.0.0/33").is_err() && Cidr::parse("ten/8").is_err());
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies_and_read_from_the_right() {
        let t = TrustedProxies { blocks: vec![Cidr::parse("10.0.0.0/8").unwrap()], forwarded_for: true };
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", "6.6.6.6, 198.51.100.7".parse().unwrap());
        h.append("x-forwarded-for", "10.0.0.9".parse().unwrap());
        // The client wrote 6.6.6.6 itself; the first untrusted hop from the right is the truth.
        assert_eq!(t.source(ip("10.0.0.1"), &h), ip("198.51.100.7"));
        assert_eq!(t.source(ip("192.0.2.1"), &h), ip("192.0.2.1"), "not from a trusted proxy");
        let off = TrustedProxies { forwarded_for: false, ..t.clone() };
        assert_eq!(off.source(ip("10.0.0.1"), &h), ip("10.0.0.1"));
        let mut bad = HeaderMap::new();
        bad.insert("x-forwarded-for", "198.51.100.7, garbage".parse().unwrap());
        assert_eq!(t.source(ip("10.0.0.1"), &bad), ip("10.0.0.1"), "a malformed hop stops the walk");
    }
}
