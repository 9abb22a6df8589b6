//! The built-in VIP allocator.
//!
//! Every node runs an agent, and every agent runs this allocator. It needs no leader:
//! the allocation is a pure function of what the agents all see (the Services, their
//! VIPs, the pools), so agents with the same view pick the same address. Each agent
//! writes the result into `status.loadBalancer.ingress` with the Service's
//! resourceVersion as a precondition: the first write wins, the others get 409
//! Conflict and then read the address from the status like everyone else. The status
//! is the record; an address once written is kept.
//!
//! Agents whose views differ for a moment (one has not yet seen another's write) could
//! give one address to two Services. Conflicts are resolved by the same rule on every
//! agent: the older Service (creation time, then namespace/name) keeps the address
//! and the younger is allocated again, away from it.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::IpNet;

use crate::model::Protocol;

/// One Service's view for the allocator, in the order allocation runs (oldest first).
#[derive(Debug, Clone)]
pub struct Claim {
    /// A stable identity: the Service's UID.
    pub uid: String,
    /// Services with the same key may share an address (on different ports).
    pub sharing_key: Option<String>,
    pub ports: Vec<(u16, Protocol)>,
    /// Addresses it already has (status, loadBalancerIP, externalIPs).
    pub has: Vec<IpAddr>,
    /// Families it wants an address of (`spec.ipFamilies`): v6 = true.
    pub wants_v6: Vec<bool>,
}

/// Probes per allocation: a bound on the work, and the largest pool we search whole.
const MAX_PROBES: u128 = 65536;
/// Seed of the start-slot hash (any constant; fixed so all agents and versions agree).
const IPAM_SEED: u64 = 0x786c_625f_6970_616d;

/// What `allocate` decided: (claim index, address), and (claim index, why not).
pub type Allocation = (Vec<(usize, IpAddr)>, Vec<(usize, String)>);

/// Addresses for claims that lack one of a wanted family: (claim index, address).
/// A wanted family whose pools are all taken gives (claim index, reason) instead.
pub fn allocate(claims: &[Claim], pools: &[IpNet]) -> Allocation {
    // Who holds each address, and on which ports.
    let mut held: BTreeMap<IpAddr, Vec<usize>> = BTreeMap::new();
    for (i, c) in claims.iter().enumerate() {
        for ip in &c.has {
            held.entry(*ip).or_default().push(i);
        }
    }
    let mut got = Vec::new();
    let mut failed = Vec::new();
    for (i, c) in claims.iter().enumerate() {
        for &v6 in &c.wants_v6 {
            if c.has.iter().any(|ip| ip.is_ipv6() == v6) {
                continue;
            }
            let family_pools: Vec<&IpNet> = pools
                .iter()
                .filter(|p| matches!(p, IpNet::V6(_)) == v6)
                .collect();
            if family_pools.is_empty() {
                continue;
            }
            let shared = c.sharing_key.as_ref().and_then(|key| {
                held.iter()
                    .filter(|(ip, _)| ip.is_ipv6() == v6)
                    .find(|(_, users)| {
                        users.iter().all(|&u| {
                            let o = &claims[u];
                            o.sharing_key.as_ref() == Some(key)
                                && !o.ports.iter().any(|p| c.ports.contains(p))
                        })
                    })
                    .map(|(ip, _)| *ip)
            });
            let ip = shared.or_else(|| {
                family_pools
                    .iter()
                    .find_map(|pool| first_free(pool, &c.uid, &held))
            });
            match ip {
                Some(ip) => {
                    held.entry(ip).or_default().push(i);
                    got.push((i, ip));
                }
                None => failed.push((
                    i,
                    format!(
                        "no free {} address in the pools {}",
                        if v6 { "IPv6" } else { "IPv4" },
                        family_pools
                            .iter()
                            .map(|p| p.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )),
            }
        }
    }
    (got, failed)
}

/// The first address not held, probing from a slot that depends on the UID only, so
/// Services created together do not all race for the pool's first address.
fn first_free(pool: &IpNet, uid: &str, held: &BTreeMap<IpAddr, Vec<usize>>) -> Option<IpAddr> {
    let (first, size) = usable_range(pool);
    if size == 0 {
        return None;
    }
    let start = crate::maglev::seeded_hash(uid.as_bytes(), IPAM_SEED) as u128 % size;
    (0..size.min(MAX_PROBES))
        .map(|probe| nth(pool, first + (start + probe) % size))
        .find(|ip| !held.contains_key(ip))
}

/// Offset of the first usable address and how many there are. IPv4 pools of /30 and
/// wider leave out the network and broadcast addresses, which some clients refuse.
fn usable_range(pool: &IpNet) -> (u128, u128) {
    let host_bits = (pool.max_prefix_len() - pool.prefix_len()) as u32;
    let size = 1u128.checked_shl(host_bits).unwrap_or(u128::MAX);
    match pool {
        IpNet::V4(_) if host_bits >= 2 => (1, size - 2),
        _ => (0, size),
    }
}

fn nth(pool: &IpNet, i: u128) -> IpAddr {
    match pool {
        IpNet::V4(n) => IpAddr::V4(Ipv4Addr::from(
            u32::from(n.network()).wrapping_add(i as u32),
        )),
        IpNet::V6(n) => IpAddr::V6(Ipv6Addr::from(u128::from(n.network()).wrapping_add(i))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(uid: &str, has: &[&str], v6: &[bool]) -> Claim {
        Claim {
            uid: uid.into(),
            sharing_key: None,
            ports: vec![(80, Protocol::Tcp)],
            has: has.iter().map(|s| s.parse().unwrap()).collect(),
            wants_v6: v6.to_vec(),
        }
    }

    #[test]
    fn allocates_inside_the_pool_and_never_twice() {
        let pools = vec!["192.0.2.0/29".parse().unwrap()];
        let claims: Vec<Claim> = (0..6)
            .map(|i| claim(&format!("uid-{i}"), &[], &[false]))
            .collect();
        let (got, failed) = allocate(&claims, &pools);
        assert!(failed.is_empty(), "{failed:?}");
        assert_eq!(got.len(), 6);
        let mut ips: Vec<IpAddr> = got.iter().map(|(_, ip)| *ip).collect();
        ips.sort();
        ips.dedup();
        assert_eq!(ips.len(), 6, "distinct addresses");
        for ip in ips {
            let IpAddr::V4(v4) = ip else { panic!() };
            let last = v4.octets()[3];
            assert!(
                (1..=6).contains(&last),
                "{ip}: not the network or broadcast address"
            );
        }
        // The pool (6 usable) is now full: a seventh Service gets a reason, not an address.
        let mut more = claims.clone();
        for (i, ip) in &got {
            more[*i].has.push(*ip);
        }
        more.push(claim("uid-7", &[], &[false]));
        let (got, failed) = allocate(&more, &pools);
        assert!(got.is_empty());
        assert_eq!(failed.len(), 1);
        assert!(
            failed[0].1.contains("no free IPv4 address"),
            "{}",
            failed[0].1
        );
    }

    #[test]
    fn the_same_view_gives_the_same_answer() {
        let pools = vec![
            "10.0.0.0/16".parse().unwrap(),
            "fd00::/112".parse().unwrap(),
        ];
        let claims = vec![
            claim("a", &["10.0.0.7"], &[false]),
            claim("b", &[], &[false, true]),
            claim("c", &[], &[true]),
        ];
        let first = allocate(&claims, &pools);
        for _ in 0..3 {
            assert_eq!(allocate(&claims, &pools), first);
        }
        let fams: Vec<(usize, bool)> = first.0.iter().map(|(i, ip)| (*i, ip.is_ipv6())).collect();
        assert_eq!(fams, vec![(1, false), (1, true), (2, true)]);
        assert!(first.0.iter().all(|(_, ip)| ip.to_string() != "10.0.0.7"));
    }

    #[test]
    fn existing_addresses_are_kept_and_missing_pools_skip() {
        let pools = vec!["10.0.0.0/24".parse().unwrap()];
        let claims = vec![
            claim("a", &["203.0.113.9"], &[false]),
            claim("b", &[], &[true]),
        ];
        let (got, failed) = allocate(&claims, &pools);
        assert!(
            got.is_empty(),
            "a has an address; b wants IPv6 and there is no IPv6 pool"
        );
        assert!(failed.is_empty());
    }

    #[test]
    fn sharing_needs_the_same_key_and_distinct_ports() {
        let pools = vec!["10.0.0.0/24".parse().unwrap()];
        let mut a = claim("a", &["10.0.0.50"], &[false]);
        a.sharing_key = Some("web".into());
        let mut b = claim("b", &[], &[false]);
        b.sharing_key = Some("web".into());
        b.ports = vec![(443, Protocol::Tcp)];
        let mut c = claim("c", &[], &[false]);
        c.sharing_key = Some("web".into()); // same port as a: cannot share
        let mut d = claim("d", &[], &[false]);
        d.sharing_key = Some("other".into());
        d.ports = vec![(53, Protocol::Udp)];
        let (got, _) = allocate(&[a, b, c, d], &pools);
        let at = |i| got.iter().find(|(j, _)| *j == i).unwrap().1.to_string();
        assert_eq!(at(1), "10.0.0.50");
        assert_ne!(at(2), "10.0.0.50");
        assert_ne!(at(3), "10.0.0.50");
    }
}
