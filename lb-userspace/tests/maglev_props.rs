//! Property tests of the Maglev builder: coverage, balance, minimal disruption, order
//! independence and weights.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use proptest::prelude::*;
use xlb::maglev::{build, slot_counts, WeightedBackend};

const PRIMES: [u32; 5] = [251, 1021, 4093, 16381, 65537];

fn backend(i: u32, v6: bool) -> WeightedBackend {
    let ip = if v6 {
        IpAddr::V6(Ipv6Addr::new(
            0xfd00,
            0,
            0,
            0,
            0,
            0,
            (i >> 16) as u16,
            i as u16,
        ))
    } else {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))
    };
    WeightedBackend {
        addr: SocketAddr::new(ip, 8000 + (i % 7) as u16),
        weight: 1,
    }
}

fn backends(ids: &[u32]) -> Vec<WeightedBackend> {
    ids.iter().map(|&i| backend(i, i % 3 == 0)).collect()
}

/// The table expressed as backend identities, so tables built from differently
/// ordered or differently sized lists can be compared slot by slot.
fn by_addr(bs: &[WeightedBackend], table: &[u32]) -> Vec<SocketAddr> {
    table.iter().map(|&i| bs[i as usize].addr).collect()
}

fn unique_ids(max_n: usize) -> impl Strategy<Value = Vec<u32>> {
    prop::collection::hash_set(0u32..1_000_000, 1..=max_n).prop_map(|s| {
        let mut v: Vec<u32> = s.into_iter().collect();
        v.sort();
        v
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn every_slot_is_filled_only_with_active_backends(ids in unique_ids(40), m_idx in 0usize..4, drained in prop::collection::vec(any::<bool>(), 40)) {
        let m = PRIMES[m_idx];
        let mut bs = backends(&ids);
        for (b, d) in bs.iter_mut().zip(&drained) {
            if *d { b.weight = 0; }
        }
        prop_assume!(bs.iter().any(|b| b.weight > 0));
        let t = build(&bs, m).unwrap();
        prop_assert_eq!(t.len(), m as usize);
        for &i in &t {
            prop_assert!((i as usize) < bs.len());
            prop_assert!(bs[i as usize].weight > 0, "drained backend {} got a slot", bs[i as usize].addr);
        }
    }

    /// max/average share ≤ 1.01 whenever M ≥ 100·N.
    #[test]
    fn balanced_when_m_is_at_least_100_n(ids in unique_ids(655), m_idx in 0usize..5) {
        let m = PRIMES[m_idx];
        let n = ids.len().min((m / 100) as usize).max(1);
        let bs = backends(&ids[..n]);
        let counts = slot_counts(&build(&bs, m).unwrap(), n);
        let avg = m as f64 / n as f64;
        let max = *counts.iter().max().unwrap() as f64;
        prop_assert!(max / avg <= 1.01, "max/avg {} (N={n}, M={m})", max / avg);
    }

    #[test]
    fn table_does_not_depend_on_order(ids in unique_ids(50), seed in any::<u64>()) {
        let bs = backends(&ids);
        let mut shuffled = bs.clone();
        // Deterministic Fisher-Yates from the seed.
        let mut s = seed | 1;
        for i in (1..shuffled.len()).rev() {
            s ^= s << 13; s ^= s >> 7; s ^= s << 17;
            shuffled.swap(i, (s % (i as u64 + 1)) as usize);
        }
        let a = by_addr(&bs, &build(&bs, 4093).unwrap());
        let b = by_addr(&shuffled, &build(&shuffled, 4093).unwrap());
        prop_assert_eq!(a, b);
    }

    /// Removing k of N: the removed backends' slots move, and only a few others.
    #[test]
    fn removal_disrupts_little(ids in unique_ids(120), k in 1usize..4) {
        prop_assume!(ids.len() > k + 2);
        let m = 16381;
        let before_bs = backends(&ids);
        let after_bs = backends(&ids[k..]);
        let before = by_addr(&before_bs, &build(&before_bs, m).unwrap());
        let after = by_addr(&after_bs, &build(&after_bs, m).unwrap());
        let removed: Vec<SocketAddr> = before_bs[..k].iter().map(|b| b.addr).collect();
        let survivors_moved = before.iter().zip(&after).filter(|(b, a)| b != a && !removed.contains(b)).count();
        // Maglev is not minimally disruptive: survivors also trade slots, about as many
        // as the removed backends held. Over 3000 random cases (N 5..120, k 1..3,
        // M 16381), the worst was (moved - 1% of M) = 1.24 × the removed share, of
        // 4,000 more 1.17 ×; the bound allows 2 ×, as for an addition, whose tail a CI
        // run found past 1.5 × (below). (It was 1.0 ×, then 1.5 ×.)
        let ideal_removed = m as f64 * k as f64 / ids.len() as f64;
        prop_assert!((survivors_moved as f64) <= 2.0 * ideal_removed + 0.01 * m as f64,
            "survivors moved {survivors_moved} slots, removed backends held ~{ideal_removed:.0}");
    }

    #[test]
    fn addition_disrupts_little(ids in unique_ids(120)) {
        prop_assume!(ids.len() > 3);
        let m = 16381;
        let before_bs = backends(&ids[1..]);
        let after_bs = backends(&ids);
        let before = by_addr(&before_bs, &build(&before_bs, m).unwrap());
        let after = by_addr(&after_bs, &build(&after_bs, m).unwrap());
        let new = after_bs[0].addr;
        let moved_to_new = after.iter().filter(|a| **a == new).count();
        let moved_elsewhere = before.iter().zip(&after).filter(|(b, a)| b != a && **a != new).count();
        let ideal_new = m as f64 / ids.len() as f64;
        prop_assert!((moved_to_new as f64) <= ideal_new * 1.02 + 1.0);
        // As for removal, a tail: the worst of 3000 random cases was 1.24 × the new
        // share, of two later sets of 4,000 cases 1.17 × and 1.49 ×, and a CI run drew
        // 1.56 × (N 89: 451 slots moved, kept in maglev_props.proptest-regressions and
        // replayed every run). The bound allows 2 ×; a table that is not Maglev's (a
        // hash modulo N, say) moves most of its slots on any change.
        prop_assert!((moved_elsewhere as f64) <= 2.0 * ideal_new + 0.01 * m as f64,
            "{moved_elsewhere} slots moved between old backends; the new one took {moved_to_new}");
    }

    /// Each share is within ±2% (relative) of its weight's proportion.
    #[test]
    fn shares_follow_weights(weights in prop::collection::vec(1u32..=8, 2..12)) {
        let m = 65537;
        let mut bs = backends(&(0..weights.len() as u32).collect::<Vec<_>>());
        for (b, w) in bs.iter_mut().zip(&weights) { b.weight = *w; }
        let counts = slot_counts(&build(&bs, m).unwrap(), bs.len());
        let total: u32 = weights.iter().sum();
        for (c, w) in counts.iter().zip(&weights) {
            let want = m as f64 * *w as f64 / total as f64;
            prop_assert!((*c as f64 - want).abs() <= 0.02 * want, "weight {w}: {c} slots, want {want:.0}");
        }
    }
}

/// The figures DESIGN.md quotes: removing 1 of 1000 backends with M=65537 changes about
/// 0.6% of slots, of which about 0.5% belonged to survivors. The bound: ≤ 1%.
#[test]
fn remove_one_of_1000_at_65537_changes_under_one_percent() {
    let m = 65537;
    let ids: Vec<u32> = (0..1000).collect();
    let all = backends(&ids);
    let table = by_addr(&all, &build(&all, m).unwrap());
    for removed in [0usize, 317, 999] {
        let rest: Vec<WeightedBackend> = all
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != removed)
            .map(|(_, b)| *b)
            .collect();
        let after = by_addr(&rest, &build(&rest, m).unwrap());
        let changed = table.iter().zip(&after).filter(|(a, b)| a != b).count();
        let survivors = table
            .iter()
            .zip(&after)
            .filter(|(a, b)| a != b && **a != all[removed].addr)
            .count();
        let (pc, ps) = (
            100.0 * changed as f64 / m as f64,
            100.0 * survivors as f64 / m as f64,
        );
        println!("removed #{removed}: {pc:.3}% of slots changed, {ps:.3}% were survivors'");
        assert!(pc <= 1.0, "{pc:.3}% of slots changed");
    }
}
