//! Source addresses: who the client is behind trusted proxies, the PBX
//! allow-list, and the limit on sources that probe call-response with
//! unknown keys.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use hyper::HeaderMap;
use ipnet::IpNet;

use super::windows::Windows;
use super::AuthError;

/// The PBX allow-list and the proxies whose `X-Forwarded-For` is believed.
#[derive(Debug, Clone)]
pub struct Network {
    pbx_allow: Vec<IpNet>,
    trusted_proxies: Vec<IpNet>,
}

/// Who sent a request, as far as can be told.
///
/// `Unknown` is what a trusted proxy's `X-Forwarded-For` that cannot be
/// read leaves us with. It is a value of its own, not a stand-in address,
/// so that it can match no allow-list by construction, and so that every
/// such client shares one count in the limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientAddr {
    Known(IpAddr),
    Unknown,
}

impl ClientAddr {
    /// The address, when known.
    pub fn ip(self) -> Option<IpAddr> {
        match self {
            ClientAddr::Known(ip) => Some(ip.to_canonical()),
            ClientAddr::Unknown => None,
        }
    }

    /// Whether the client is inside one of `nets`; an unknown one never is.
    pub fn within(self, nets: &[IpNet]) -> bool {
        self.ip().is_some_and(|ip| contains(nets, ip))
    }

    /// The source a limit counts this client as: an IPv4 address (mapped
    /// ones included), or an IPv6 /64, since one subscriber is routinely
    /// given a whole /64 and could otherwise count as billions of sources.
    pub(crate) fn source(self) -> ClientAddr {
        match self.ip() {
            Some(IpAddr::V6(ip)) => {
                let prefix = u128::from(ip) & !u128::from(u64::MAX);
                ClientAddr::Known(IpAddr::V6(Ipv6Addr::from(prefix)))
            }
            Some(ipv4) => ClientAddr::Known(ipv4),
            None => ClientAddr::Unknown,
        }
    }
}

impl fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip() {
            Some(ip) => ip.fmt(f),
            None => f.write_str("unknown"),
        }
    }
}

fn contains(nets: &[IpNet], ip: IpAddr) -> bool {
    nets.iter().any(|net| net.contains(&ip))
}

/// One `X-Forwarded-For` entry: `ip`, `ip:port`, `[ipv6]` or `[ipv6]:port`,
/// with optional spaces around it. Anything else (`unknown`, an obfuscated
/// name, an empty entry, bytes that are not ASCII) is unreadable: `None`.
fn read_hop(entry: &[u8]) -> Option<IpAddr> {
    let entry = std::str::from_utf8(entry)
        .ok()?
        .trim_matches(|c| c == ' ' || c == '\t');
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Ok(socket) = entry.parse::<SocketAddr>() {
        return Some(socket.ip().to_canonical());
    }
    let bracketed = entry.strip_prefix('[')?.strip_suffix(']')?;
    bracketed
        .parse::<Ipv6Addr>()
        .ok()
        .map(|ip| IpAddr::V6(ip).to_canonical())
}

impl Network {
    pub fn new(pbx_allow: Vec<IpNet>, trusted_proxies: Vec<IpNet>) -> Self {
        Network {
            pbx_allow,
            trusted_proxies,
        }
    }

    /// The client: the peer, unless the peer is a trusted proxy. Then every
    /// `X-Forwarded-For` line, in order, is read as one comma-separated list
    /// and walked from the right, the end our own proxies wrote:
    ///
    /// - the first entry that is not a trusted proxy is the client (entries
    ///   to its left are the client's own claims, never read);
    /// - an entry the walk reaches that cannot be read makes the client
    ///   [`ClientAddr::Unknown`]: skipping it would believe the entry to its
    ///   left, which the client may have written;
    /// - when every entry is a trusted proxy, the left-most is the client (a
    ///   request from inside, e.g. a health check through a second proxy),
    ///   as nginx's `real_ip_recursive` does;
    /// - no header at all: the peer itself is the client.
    ///
    /// The list is split on the comma byte before any entry is decoded, so
    /// bytes that are not ASCII spoil only their own entry; an entry the
    /// walk does not reach cannot change the answer.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> ClientAddr {
        let peer = peer.to_canonical();
        if !contains(&self.trusted_proxies, peer) {
            return ClientAddr::Known(peer);
        }
        let hops: Vec<&[u8]> = headers
            .get_all("x-forwarded-for")
            .iter()
            .flat_map(|line| line.as_bytes().split(|b| *b == b','))
            .collect();
        let mut client = ClientAddr::Known(peer);
        for hop in hops.iter().rev() {
            match read_hop(hop) {
                None => return ClientAddr::Unknown,
                Some(ip) if !contains(&self.trusted_proxies, ip) => return ClientAddr::Known(ip),
                Some(proxy) => client = ClientAddr::Known(proxy),
            }
        }
        client
    }

    /// Whether `client` may post incoming calls.
    pub fn pbx_allowed(&self, client: ClientAddr) -> bool {
        client.within(&self.pbx_allow)
    }
}

/// Unknown-key answers a source may give per window before it is refused.
const PROBE_LIMIT: u32 = 20;
const PROBE_WINDOW: Duration = Duration::from_secs(10);
/// Most sources tracked; a full table drops its oldest unblocked windows.
const PROBE_SOURCES_CAP: usize = 10_000;
/// What a refused prober is told.
const PROBE_RULE: &str = "at most 20 unknown keys per source in 10 s";

/// Counts call-responses with unknown keys per source (IPv6 by /64). A
/// source over the limit gets 429 for every call-response until its window
/// ends, for a live key too ([`ProbeLimiter::check`], before the key is
/// looked up): were a hit still answered and acted on, a blocked guesser
/// would learn when it hit and could answer the call it hit. Answers with
/// live keys count nothing, so phones behind the same NAT as each other
/// answer as many calls at once as they have; one behind the same address
/// as a prober waits with it.
#[derive(Debug)]
pub struct ProbeLimiter {
    windows: Windows<ClientAddr>,
}

impl Default for ProbeLimiter {
    fn default() -> Self {
        ProbeLimiter {
            windows: Windows::new(PROBE_LIMIT, PROBE_WINDOW, PROBE_SOURCES_CAP),
        }
    }
}

impl ProbeLimiter {
    /// Refuses every call-response from `client` while its source is over
    /// the limit; counts nothing, so a hit never uses up a source's window
    /// (nor wipes out its misses).
    pub fn check(&self, client: ClientAddr) -> Result<(), AuthError> {
        self.windows
            .check(client.source())
            .map_err(|retry_after| AuthError::Throttled {
                rule: PROBE_RULE,
                retry_after,
            })
    }

    /// Records one unknown key from `client`; refuses it when its source
    /// is over the limit (misses that were in flight together when it got
    /// there).
    pub fn miss(&self, client: ClientAddr) -> Result<(), AuthError> {
        let source = client.source();
        match self.windows.take(source) {
            Ok(used_up) => {
                if used_up {
                    tracing::warn!(%source, "call-response with unknown keys too often; refusing every call-response from it for a while");
                }
                Ok(())
            }
            Err(retry_after) => Err(AuthError::Throttled {
                rule: PROBE_RULE,
                retry_after,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> ClientAddr {
        ClientAddr::Known(s.parse().unwrap())
    }

    /// Headers with one `X-Forwarded-For` line per item, raw bytes allowed.
    fn xff(lines: &[&[u8]]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for line in lines {
            headers.append("x-forwarded-for", HeaderValue::from_bytes(line).unwrap());
        }
        headers
    }

    #[test]
    fn forwarded_for_is_walked_from_the_right() {
        let network = Network::new(vec![], vec![net("192.168.1.0/24"), net("fd00::/8")]);
        let proxy: IpAddr = "192.168.1.5".parse().unwrap();
        let unknown = ClientAddr::Unknown;
        #[rustfmt::skip]
        let table: &[(&[&[u8]], ClientAddr)] = &[
            // No header: the proxy itself.
            (&[], ip("192.168.1.5")),
            (&[b"10.1.2.3"], ip("10.1.2.3")),
            // A client's claim left of its real address gains nothing.
            (&[b"10.1.2.3, 198.51.100.7"], ip("198.51.100.7")),
            // Chained trusted proxies are skipped.
            (&[b"10.9.9.9, 192.168.1.7"], ip("10.9.9.9")),
            (&[b"10.9.9.9,192.168.1.7 , fd00::1"], ip("10.9.9.9")),
            // Every form of an address, with and without a port.
            (&[b"10.1.2.3, 203.0.113.9:5555"], ip("203.0.113.9")),
            (&[b"10.1.2.3, [2001:db8::1]"], ip("2001:db8::1")),
            (&[b"10.1.2.3, [2001:db8::1]:5555"], ip("2001:db8::1")),
            (&[b"10.1.2.3, 2001:db8::1"], ip("2001:db8::1")),
            (&[b"10.1.2.3, ::ffff:203.0.113.9"], ip("203.0.113.9")),
            (&[b"10.1.2.3, [::ffff:203.0.113.9]:80"], ip("203.0.113.9")),
            (&[b"\t203.0.113.9\t"], ip("203.0.113.9")),
            // An entry the walk reaches that cannot be read: unknown, never
            // the client-written entry to its left.
            (&[b"10.1.2.3, unknown"], unknown),
            (&[b"10.1.2.3, _hidden"], unknown),
            (&[b"10.1.2.3, "], unknown),
            (&[b"10.1.2.3,,192.168.1.7"], unknown),
            (&[b""], unknown),
            (&[b"10.1.2.3, 203.0.113.9:99999"], unknown),
            (&[b"10.1.2.3, [10.1.2.4]"], unknown),
            (&[b"10.1.2.3, 2001:db8::1:5555:1:2:3:4:5"], unknown),
            (&[b"10.1.2.3, 010.1.2.3"], unknown),
            (&[b"10.1.2.3, 203.0.113.9 5555"], unknown),
            (&[b"10.1.2.3, unknown, 192.168.1.7"], unknown),
            (&[b"10.1.2.3, 203.0.113.9\xff"], unknown),
            (&["10.1.2.3, 203.0.113.\u{661}".as_bytes()], unknown),
            (&[b"10.1.2.3\xe9"], unknown),
            // Unreadable bytes left of the client are its own claims.
            (&[b"\xe9\xe9, 198.51.100.7"], ip("198.51.100.7")),
            // Several lines are one list, in order.
            (&[b"10.1.2.3", b"198.51.100.7"], ip("198.51.100.7")),
            (&[b"\xe9", b"198.51.100.7"], ip("198.51.100.7")),
            (&[b"198.51.100.7", b"unknown"], unknown),
            (&[b"198.51.100.7", b"192.168.1.7"], ip("198.51.100.7")),
            // Every entry a trusted proxy: the left-most.
            (&[b"192.168.1.9, 192.168.1.7"], ip("192.168.1.9")),
        ];
        for (lines, expected) in table {
            let shown: Vec<String> = lines
                .iter()
                .map(|l| String::from_utf8_lossy(l).into_owned())
                .collect();
            assert_eq!(
                network.client_ip(proxy, &xff(lines)),
                *expected,
                "{shown:?}"
            );
        }
    }

    #[test]
    fn forwarded_for_is_ignored_from_anyone_else() {
        let network = Network::new(vec![], vec![net("192.168.1.0/24")]);
        let stranger: IpAddr = "203.0.113.9".parse().unwrap();
        for lines in [&[&b"10.1.2.3"[..]][..], &[b"unknown"], &[b"\xff"]] {
            assert_eq!(
                network.client_ip(stranger, &xff(lines)),
                ClientAddr::Known(stranger)
            );
        }
        // A mapped peer is a trusted IPv4 proxy.
        let mapped: IpAddr = "::ffff:192.168.1.5".parse().unwrap();
        assert_eq!(
            network.client_ip(mapped, &xff(&[b"10.1.2.3"])),
            ip("10.1.2.3")
        );
    }

    #[test]
    fn an_unknown_client_matches_no_list() {
        let everything = [net("0.0.0.0/0"), net("::/0")];
        assert!(!ClientAddr::Unknown.within(&everything));
        assert!(ip("203.0.113.9").within(&everything));
        let network = Network::new(everything.to_vec(), vec![]);
        assert!(!network.pbx_allowed(ClientAddr::Unknown));
        assert_eq!(ClientAddr::Unknown.to_string(), "unknown");
    }

    #[test]
    fn mapped_ipv4_addresses_match_ipv4_networks() {
        let network = Network::new(vec![net("127.0.0.0/8")], vec![]);
        assert!(network.pbx_allowed(ip("::ffff:127.0.0.1")));
        assert!(!network.pbx_allowed(ip("::ffff:10.0.0.1")));
    }

    #[test]
    fn limits_count_ipv6_by_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(
            ip("2001:db8:1:2:aaaa::1").source(),
            ip("2001:db8:1:2:ffff:1:2:3").source()
        );
        assert_ne!(
            ip("2001:db8:1:2::1").source(),
            ip("2001:db8:1:3::1").source()
        );
        assert_eq!(ip("::ffff:203.0.113.9").source(), ip("203.0.113.9"));
        assert_ne!(ip("203.0.113.9").source(), ip("203.0.113.10").source());
        assert_eq!(ClientAddr::Unknown.source(), ClientAddr::Unknown);
    }

    #[test]
    fn probing_is_refused_past_the_limit_per_source() {
        let limiter = ProbeLimiter::default();
        let a = ip("203.0.113.1");
        for _ in 0..PROBE_LIMIT {
            assert!(limiter.miss(a).is_ok());
        }
        assert!(matches!(limiter.miss(a), Err(AuthError::Throttled { .. })));
        assert!(limiter.miss(ip("203.0.113.2")).is_ok());
    }

    #[test]
    fn one_64_shares_a_probe_count_and_unknown_is_one_source() {
        let limiter = ProbeLimiter::default();
        for n in 0..PROBE_LIMIT {
            assert!(limiter.miss(ip(&format!("2001:db8:0:1::{n:x}"))).is_ok());
        }
        assert!(limiter.miss(ip("2001:db8:0:1:ffff::1")).is_err());
        assert!(limiter.miss(ip("2001:db8:0:2::1")).is_ok());
        for _ in 0..PROBE_LIMIT {
            assert!(limiter.miss(ClientAddr::Unknown).is_ok());
        }
        assert!(limiter.miss(ClientAddr::Unknown).is_err());
    }

    #[test]
    fn a_blocked_source_is_refused_hit_or_miss_and_hits_do_not_reset_misses() {
        let limiter = ProbeLimiter::default();
        let a = ip("203.0.113.1");
        for _ in 0..PROBE_LIMIT - 1 {
            assert!(limiter.check(a).is_ok());
            assert!(limiter.miss(a).is_ok());
        }
        // Hits are checked and count nothing, however many.
        for _ in 0..100 {
            assert!(limiter.check(a).is_ok());
        }
        assert!(limiter.miss(a).is_ok(), "the last miss");
        // Over: every answer is refused before its key is looked up.
        assert!(matches!(limiter.check(a), Err(AuthError::Throttled { .. })));
        assert!(limiter.check(ip("203.0.113.2")).is_ok());
    }

    #[test]
    fn a_blocked_prober_stays_blocked_after_more_sources_than_the_table_holds() {
        let limiter = ProbeLimiter::default();
        let prober = ip("203.0.113.1");
        for _ in 0..PROBE_LIMIT {
            assert!(limiter.miss(prober).is_ok());
        }
        assert!(limiter.miss(prober).is_err());
        // Distinct /64s, each one new source.
        for n in 0..(PROBE_SOURCES_CAP as u128 + 5_000) {
            let other = Ipv6Addr::from((0x2001_0db8_u128 << 96) | (n << 64));
            assert!(limiter.miss(ClientAddr::Known(IpAddr::V6(other))).is_ok());
        }
        assert!(limiter.miss(prober).is_err(), "still blocked");
    }
}
