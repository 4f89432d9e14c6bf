//! Source addresses: the PBX allow-list, trusted proxies, and the limit on
//! sources that probe call-response with unknown keys.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hyper::HeaderMap;
use ipnet::IpNet;

/// The PBX allow-list and the proxies whose `X-Forwarded-For` is believed.
#[derive(Debug, Clone)]
pub struct Network {
    pbx_allow: Vec<IpNet>,
    trusted_proxies: Vec<IpNet>,
}

fn contains(nets: &[IpNet], ip: IpAddr) -> bool {
    nets.iter().any(|net| net.contains(&ip))
}

impl Network {
    pub fn new(pbx_allow: Vec<IpNet>, trusted_proxies: Vec<IpNet>) -> Self {
        Network {
            pbx_allow,
            trusted_proxies,
        }
    }

    /// The client's address: the peer's, unless the peer is a trusted proxy;
    /// then the right-most `X-Forwarded-For` entry that is not itself a
    /// trusted proxy (entries to its left are the client's own claims).
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if !contains(&self.trusted_proxies, peer) {
            return peer;
        }
        let hops: Vec<IpAddr> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|hop| hop.trim().parse::<IpAddr>().ok())
            .map(|ip| ip.to_canonical())
            .collect();
        hops.iter()
            .rev()
            .find(|ip| !contains(&self.trusted_proxies, **ip))
            .or(hops.first())
            .copied()
            .unwrap_or(peer)
    }

    /// Whether `ip` may post incoming calls.
    pub fn pbx_allowed(&self, ip: IpAddr) -> bool {
        contains(&self.pbx_allow, ip.to_canonical())
    }
}

/// Unknown-key answers a source may give per window before it is refused.
const PROBE_LIMIT: u32 = 20;
const PROBE_WINDOW: Duration = Duration::from_secs(10);
/// Most sources tracked; beyond it finished windows are dropped, then all.
const PROBE_SOURCES_CAP: usize = 10_000;

/// Counts call-responses with unknown keys per source address. A source
/// over the limit gets 429 for unknown keys until its window ends; answers
/// with a live key are never held back, so phones behind the same NAT as a
/// prober still get their calls.
#[derive(Debug, Default)]
pub struct ProbeLimiter {
    windows: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl ProbeLimiter {
    /// Records one unknown key from `ip`. Returns how long the source must
    /// wait when it is over the limit.
    pub fn miss(&self, ip: IpAddr) -> Option<Duration> {
        let now = Instant::now();
        let mut windows = self.windows.lock().expect("probe lock");
        if windows.len() >= PROBE_SOURCES_CAP && !windows.contains_key(&ip) {
            windows.retain(|_, (start, _)| now.duration_since(*start) < PROBE_WINDOW);
            if windows.len() >= PROBE_SOURCES_CAP {
                windows.clear();
            }
        }
        let (start, count) = windows.entry(ip).or_insert((now, 0));
        if now.duration_since(*start) >= PROBE_WINDOW {
            *start = now;
            *count = 0;
        }
        *count += 1;
        (*count > PROBE_LIMIT).then(|| PROBE_WINDOW.saturating_sub(now.duration_since(*start)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn xff(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", value.parse().unwrap());
        headers
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let network = Network::new(vec![net("10.0.0.0/8")], vec![net("192.168.1.0/24")]);
        let proxy: IpAddr = "192.168.1.5".parse().unwrap();
        let stranger: IpAddr = "203.0.113.9".parse().unwrap();
        assert_eq!(
            network.client_ip(proxy, &xff("10.1.2.3")),
            "10.1.2.3".parse::<IpAddr>().unwrap()
        );
        assert_eq!(network.client_ip(stranger, &xff("10.1.2.3")), stranger);
        // A client claiming an allowed address left of the real one gains nothing.
        assert_eq!(
            network.client_ip(proxy, &xff("10.1.2.3, 198.51.100.7")),
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
        // Chained trusted proxies are skipped.
        assert_eq!(
            network.client_ip(proxy, &xff("10.9.9.9, 192.168.1.7")),
            "10.9.9.9".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn mapped_ipv4_addresses_match_ipv4_networks() {
        let network = Network::new(vec![net("127.0.0.0/8")], vec![]);
        assert!(network.pbx_allowed("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!network.pbx_allowed("::ffff:10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn probing_is_refused_past_the_limit_per_source() {
        let limiter = ProbeLimiter::default();
        let a: IpAddr = "203.0.113.1".parse().unwrap();
        let b: IpAddr = "203.0.113.2".parse().unwrap();
        for _ in 0..PROBE_LIMIT {
            assert!(limiter.miss(a).is_none());
        }
        assert!(limiter.miss(a).is_some());
        assert!(limiter.miss(b).is_none());
    }
}
