//! Who may reach a service: its source ranges (`allow:`, `loadBalancerSourceRanges`) as
//! entries of the XLB_SOURCE_RANGES trie, keyed by service id. A pure plan (what is
//! written, what is wanted → additions and removals) and the writes; the codec between
//! a range and the trie's key lives here too.

use std::{collections::BTreeSet, net::IpAddr};

use anyhow::{Context, Result};
use aya::maps::{
    lpm_trie::{Key, LpmTrie},
    MapData,
};
use ipnet::IpNet;
use lb_common::{SourceRangeKey, FAMILY_V4, FAMILY_V6, SOURCE_RANGE_HEADER_BITS};

/// One range of one service.
pub type Entry = (u32, IpNet);

/// The trie's key for a range of service `id`.
pub fn encode(id: u32, net: &IpNet) -> Key<SourceRangeKey> {
    let mut addr = [0u8; 16];
    let family = match net.addr() {
        IpAddr::V4(a) => {
            addr[..4].copy_from_slice(&a.octets());
            FAMILY_V4
        }
        IpAddr::V6(a) => {
            addr.copy_from_slice(&a.octets());
            FAMILY_V6
        }
    };
    Key::new(
        SOURCE_RANGE_HEADER_BITS + net.prefix_len() as u32,
        SourceRangeKey {
            service_id_be: id.to_be(),
            family,
            addr,
            _pad: [0; 3],
        },
    )
}

/// The range a trie key holds; None for a key no agent writes.
pub fn decode(key: &Key<SourceRangeKey>) -> Option<Entry> {
    let data = key.data();
    let len = key.prefix_len().checked_sub(SOURCE_RANGE_HEADER_BITS)? as u8;
    let ip = match data.family {
        FAMILY_V4 => IpAddr::from([data.addr[0], data.addr[1], data.addr[2], data.addr[3]]),
        FAMILY_V6 => IpAddr::from(data.addr),
        _ => return None,
    };
    let net = IpNet::new(ip, len).ok()?;
    Some((u32::from_be(data.service_id_be), net))
}

/// What to write to go from `written` to `wanted`: additions first, removals after,
/// so that a client in both the old and the new ranges is never refused meanwhile.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub add: Vec<Entry>,
    pub remove: Vec<Entry>,
}

pub fn plan(written: &BTreeSet<Entry>, wanted: &BTreeSet<Entry>) -> Plan {
    Plan {
        add: wanted.difference(written).copied().collect(),
        remove: written.difference(wanted).copied().collect(),
    }
}

/// The trie, opened from the loaded program's maps.
pub fn trie(ebpf: &mut aya::Ebpf) -> Result<LpmTrie<&mut MapData, SourceRangeKey, u32>> {
    let map = ebpf
        .map_mut(lb_common::MAP_SOURCE_RANGES)
        .context("source range map")?;
    Ok(LpmTrie::try_from(map)?)
}

/// What the pinned trie holds (an adopted map: written by an earlier agent).
pub fn read(trie: &LpmTrie<&mut MapData, SourceRangeKey, u32>) -> Result<BTreeSet<Entry>> {
    let mut out = BTreeSet::new();
    for key in trie.keys() {
        if let Some(e) = decode(&key.context("reading the source ranges")?) {
            out.insert(e);
        }
    }
    Ok(out)
}

pub fn add(trie: &mut LpmTrie<&mut MapData, SourceRangeKey, u32>, entries: &[Entry]) -> Result<()> {
    for (id, net) in entries {
        trie.insert(&encode(*id, net), 1, 0)
            .with_context(|| format!("writing source range {net} of service {id}"))?;
    }
    Ok(())
}

pub fn remove(
    trie: &mut LpmTrie<&mut MapData, SourceRangeKey, u32>,
    entries: &[Entry],
) -> Result<()> {
    for (id, net) in entries {
        // Already gone is fine.
        let _ = trie.remove(&encode(*id, net));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn keys_round_trip_for_both_families_and_every_prefix_length() {
        for s in [
            "0.0.0.0/0",
            "10.0.0.0/8",
            "192.0.2.7/32",
            "::/0",
            "2001:db8::/32",
            "::ffff:10.0.0.0/104",
            "fd00::1/128",
        ] {
            let n = net(s);
            assert_eq!(decode(&encode(7, &n)), Some((7, n)), "{s}");
        }
    }

    #[test]
    fn an_ipv4_and_an_ipv6_range_of_the_same_bits_are_different_keys() {
        // 10.0.0.0/8 and 0a00::/8 share their first 8 address bits: the family byte
        // keeps them apart, so a v6 lookup can never match a v4 range.
        let (a, b) = (encode(1, &net("10.0.0.0/8")), encode(1, &net("a00::/8")));
        assert_ne!(a.data(), b.data());
        assert_eq!(a.prefix_len(), b.prefix_len());
    }

    #[test]
    fn the_plan_adds_what_is_new_and_removes_what_went() {
        let written: BTreeSet<Entry> = [(1, net("10.0.0.0/8")), (2, net("192.0.2.0/24"))].into();
        let wanted: BTreeSet<Entry> = [(1, net("10.0.0.0/8")), (1, net("172.16.0.0/12"))].into();
        let p = plan(&written, &wanted);
        assert_eq!(p.add, vec![(1, net("172.16.0.0/12"))]);
        assert_eq!(p.remove, vec![(2, net("192.0.2.0/24"))]);
        assert_eq!(plan(&wanted, &wanted), Plan::default());
    }
}
