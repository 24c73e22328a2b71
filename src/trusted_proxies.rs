//! The client's address behind trusted reverse proxies (`WXBROKER_TRUSTED_PROXIES`).
//!
//! A proxy appends the address it sees to `X-Forwarded-For` (or adds a `Forwarded: for=`), so the
//! header reads from the original client on the left to the last proxy's peer on the right.
//! Anyone can write the left part, so the header is read from the right: the client is the
//! rightmost address that is not a trusted proxy. The header is ignored unless the connection
//! itself comes from a trusted proxy, and a value that does not parse as an address ends the walk
//! (the client is then the last trusted address seen). Rate limits, the admin failure limit and
//! the request log use this address; the connection cap counts TCP peers.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use warp::http::HeaderMap;

/// The addresses and networks whose forwarding headers are believed. Empty: none are.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Whether `ip` is one of them (an IPv4 address mapped into IPv6 counts as itself).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The client behind a connection from `peer` that sent `headers`.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.contains(peer) {
            return peer;
        }
        let mut client = peer;
        for hop in forwarded_for(headers).iter().rev() {
            let Some(ip) = hop else { break };
            client = ip.to_canonical();
            if !self.contains(client) {
                break;
            }
        }
        client
    }
}

/// The addresses a request was forwarded for, leftmost first: `X-Forwarded-For` when present,
/// else the `for=` parameters of `Forwarded` (RFC 7239). `None` for a value that is no address
/// (`unknown`, an obfuscated name, garbage).
fn forwarded_for(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    let values = |name| {
        headers
            .get_all(name)
            .iter()
            .flat_map(|value| value.to_str().unwrap_or(",").split(','))
            .map(str::trim)
            .collect::<Vec<_>>()
    };
    let xff = values("x-forwarded-for");
    if !xff.is_empty() {
        return xff.into_iter().map(parse_node).collect();
    }
    values("forwarded")
        .into_iter()
        .map(|element| {
            element
                .split(';')
                .filter_map(|pair| pair.trim().split_once('='))
                .find(|(key, _)| key.eq_ignore_ascii_case("for"))
                .and_then(|(_, node)| parse_node(node.trim_matches('"')))
        })
        .collect()
}

/// An address as a header writes it: `192.0.2.1`, `192.0.2.1:4711`, `2001:db8::1` or
/// `[2001:db8::1]:4711`.
fn parse_node(node: &str) -> Option<IpAddr> {
    if let Ok(ip) = node.parse() {
        return Some(ip);
    }
    if let Some(rest) = node.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok();
    }
    let (host, port) = node.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    host.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

impl FromStr for TrustedProxies {
    type Err = String;

    /// Comma-separated addresses and CIDR networks: `127.0.0.1, 10.0.0.0/8, fd00::/8`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        text.split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(|item| {
                item.parse::<IpNet>()
                    .or_else(|_| item.parse::<IpAddr>().map(IpNet::from))
                    .map(|net| net.trunc())
                    .map_err(|_| format!("{item:?} is neither an IP address nor a CIDR network"))
            })
            .collect::<Result<_, _>>()
            .map(TrustedProxies)
    }
}

impl fmt::Debug for TrustedProxies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(ToString::to_string))
            .finish()
    }
}

impl fmt::Display for TrustedProxies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let items: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&items.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                warp::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        map
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn parses_addresses_and_networks_and_refuses_the_rest() {
        let trusted: TrustedProxies = " 127.0.0.1, 10.1.2.3/8 ,fd00::/8,".parse().unwrap();
        assert_eq!(trusted.to_string(), "127.0.0.1/32,10.0.0.0/8,fd00::/8");
        assert!(trusted.contains(ip("10.200.0.1")));
        assert!(trusted.contains(ip("::ffff:127.0.0.1")));
        assert!(!trusted.contains(ip("11.0.0.1")));
        assert_eq!(
            "".parse::<TrustedProxies>().unwrap(),
            TrustedProxies::default()
        );
        let err = "127.0.0.1,nginx".parse::<TrustedProxies>().unwrap_err();
        assert!(err.contains("\"nginx\""), "{err}");
    }

    #[test]
    fn the_client_is_the_rightmost_untrusted_address_from_a_trusted_peer() {
        let trusted: TrustedProxies = "127.0.0.1,10.0.0.0/8".parse().unwrap();
        let proxy = ip("127.0.0.1");
        let forged = headers(&[("x-forwarded-for", "1.1.1.1, 203.0.113.9, 10.0.0.5")]);
        assert_eq!(trusted.client(proxy, &forged), ip("203.0.113.9"));
        // Several headers read as one list, in order.
        let split = headers(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "203.0.113.9"),
        ]);
        assert_eq!(trusted.client(proxy, &split), ip("203.0.113.9"));
        // From an untrusted peer the header is ignored.
        assert_eq!(
            trusted.client(ip("198.51.100.7"), &forged),
            ip("198.51.100.7")
        );
        // Nothing forwarded: the proxy itself.
        assert_eq!(trusted.client(proxy, &HeaderMap::new()), proxy);
        // Every hop trusted: the leftmost.
        let inside = headers(&[("x-forwarded-for", "10.0.0.9, 10.0.0.5")]);
        assert_eq!(trusted.client(proxy, &inside), ip("10.0.0.9"));
        // Garbage ends the walk at the last trusted address.
        let garbage = headers(&[("x-forwarded-for", "203.0.113.9, nonsense, 10.0.0.5")]);
        assert_eq!(trusted.client(proxy, &garbage), ip("10.0.0.5"));
        // None trusted: the peer, whatever it sends.
        assert_eq!(TrustedProxies::default().client(proxy, &forged), proxy);
    }

    #[test]
    fn forwarded_is_read_when_x_forwarded_for_is_absent() {
        let trusted: TrustedProxies = "127.0.0.1".parse().unwrap();
        let proxy = ip("127.0.0.1");
        let forwarded = headers(&[(
            "forwarded",
            "for=192.0.2.60;proto=https;by=203.0.113.43, For=\"[2001:db8:cafe::17]:4711\"",
        )]);
        assert_eq!(trusted.client(proxy, &forwarded), ip("2001:db8:cafe::17"));
        let with_port = headers(&[("forwarded", "for=\"192.0.2.60:8080\"")]);
        assert_eq!(trusted.client(proxy, &with_port), ip("192.0.2.60"));
        let hidden = headers(&[("forwarded", "for=192.0.2.60, for=_hidden")]);
        assert_eq!(trusted.client(proxy, &hidden), proxy);
    }
}
