//! Maglev consistent hashing (Eisenbud et al., NSDI 2016).
//!
//! Each backend gets a permutation of the M slots, `perm[j] = (offset + j·skip) mod M`,
//! with `offset = h1(b) mod M` and `skip = h2(b) mod (M−1) + 1`, where h1 and h2 are
//! seeded hashes of the backend's identity (address and port). The table is filled in
//! rounds: in each round every backend earns its weight in credit and spends the
//! largest weight of the set, when it has it, on a turn (Katran's weighted variant);
//! a turn claims the backend's next preferred slot that is still empty.
//!
//! Determinism is the contract between nodes: the seeds below are constants, the fill
//! order is the backends sorted by identity (never the order they were given in, never
//! a HashMap's), so any agent given the same set builds the same table.
//!
//! Permutations are generated on the fly, never stored: memory is O(M + N) and the
//! expected work is O(M log M), not the O(M·N) of materialising every permutation.

use std::{fmt, net::SocketAddr};

use thiserror::Error;

/// Seeds for h1 (offset) and h2 (skip). Changing either changes every table: all nodes
/// of a cluster must run the same values.
pub const MAGLEV_SEED_OFFSET: u64 = 0x2c9a_7b3e_51f0_d6a1;
pub const MAGLEV_SEED_SKIP: u64 = 0x9e37_79b9_7f4a_7c15;

pub const DEFAULT_TABLE_SIZE: u32 = 16381;
pub const MIN_TABLE_SIZE: u32 = 251;
/// The largest table the datapath holds (lb_common::MAGLEV_MAX_TABLE_SIZE).
pub const MAX_TABLE_SIZE: u32 = lb_common::MAGLEV_MAX_TABLE_SIZE as u32;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum MaglevError {
    #[error("table size {0} is not prime (Maglev needs a prime M; 16381 and 65537 are common)")]
    NotPrime(u32),
    #[error("table size {0} is out of range: it must be a prime between {MIN_TABLE_SIZE} and {MAX_TABLE_SIZE}")]
    OutOfRange(u32),
    #[error("no backends given")]
    NoBackends,
    #[error("duplicate backend {0}")]
    Duplicate(SocketAddr),
    #[error("every backend has weight 0 (draining): there is nothing to send new flows to")]
    AllDrained,
}

/// A backend as Maglev sees it: its identity and its weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WeightedBackend {
    pub addr: SocketAddr,
    pub weight: u32,
}

impl fmt::Display for WeightedBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.addr, self.weight)
    }
}

pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while d.saturating_mul(d) <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

pub fn validate_table_size(m: u32) -> Result<(), MaglevError> {
    if !(MIN_TABLE_SIZE..=MAX_TABLE_SIZE).contains(&m) {
        return Err(MaglevError::OutOfRange(m));
    }
    if !is_prime(m) {
        return Err(MaglevError::NotPrime(m));
    }
    Ok(())
}

/// The identity bytes of a backend: address octets then port, big-endian.
fn identity(addr: &SocketAddr) -> Vec<u8> {
    let mut v = match addr {
        SocketAddr::V4(a) => a.ip().octets().to_vec(),
        SocketAddr::V6(a) => a.ip().octets().to_vec(),
    };
    v.extend_from_slice(&addr.port().to_be_bytes());
    v
}

/// FNV-1a over the bytes from a seeded basis, then murmur3's 64-bit finaliser so every
/// input bit reaches every output bit. Stable across platforms and Rust versions.
pub(crate) fn seeded_hash(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Builds the lookup table: `table[slot]` is an index into `backends` (as given).
/// Backends of weight 0 get no slots.
pub fn build(backends: &[WeightedBackend], m: u32) -> Result<Vec<u32>, MaglevError> {
    validate_table_size(m)?;
    if backends.is_empty() {
        return Err(MaglevError::NoBackends);
    }
    // Fill order: sorted by identity, so the caller's order cannot matter.
    let mut order: Vec<(Vec<u8>, usize)> = backends
        .iter()
        .enumerate()
        .map(|(i, b)| (identity(&b.addr), i))
        .collect();
    order.sort();
    for pair in order.windows(2) {
        if pair[0].0 == pair[1].0 {
            return Err(MaglevError::Duplicate(backends[pair[0].1].addr));
        }
    }
    order.retain(|(_, i)| backends[*i].weight > 0);
    if order.is_empty() {
        return Err(MaglevError::AllDrained);
    }
    let m64 = m as u64;
    struct Perm {
        index: u32,
        weight: u64,
        /// Credit accumulated over the rounds (Katran's weighted Maglev, "V2").
        credit: u64,
        offset: u64,
        skip: u64,
        next: u64,
    }
    let mut perms: Vec<Perm> = order
        .iter()
        .map(|(id, i)| Perm {
            index: *i as u32,
            weight: backends[*i].weight as u64,
            credit: 0,
            offset: seeded_hash(id, MAGLEV_SEED_OFFSET) % m64,
            skip: seeded_hash(id, MAGLEV_SEED_SKIP) % (m64 - 1) + 1,
            next: 0,
        })
        .collect();
    // Each round, every backend earns its weight in credit and takes one slot for each
    // `max_weight` it holds: at most one slot per round, so no backend can fill the
    // table in a run of turns before the others get theirs (taking `weight` turns in a
    // row starved backends once weights were large), and shares follow the weights
    // whatever their magnitude. Equal weights give exactly the unweighted table.
    let max_weight = perms.iter().map(|p| p.weight).max().unwrap_or(1);
    const EMPTY: u32 = u32::MAX;
    let mut table = vec![EMPTY; m as usize];
    let mut filled = 0u32;
    'fill: loop {
        for p in perms.iter_mut() {
            p.credit += p.weight;
            if p.credit < max_weight {
                continue;
            }
            p.credit -= max_weight;
            // Walk this backend's permutation to its next empty slot. Since skip and
            // M are coprime the walk visits every slot, so it always finds one while
            // the table is not full.
            let mut slot = (p.offset + p.next * p.skip) % m64;
            while table[slot as usize] != EMPTY {
                p.next += 1;
                slot = (p.offset + p.next * p.skip) % m64;
            }
            table[slot as usize] = p.index;
            p.next += 1;
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    Ok(table)
}

/// Slots per backend (indexed like `backends`).
pub fn slot_counts(table: &[u32], n: usize) -> Vec<u32> {
    let mut counts = vec![0u32; n];
    for &b in table {
        counts[b as usize] += 1;
    }
    counts
}

/// Parses `ADDR:PORT[=WEIGHT]`, e.g. `10.0.0.1:80`, `[fd00::1]:443=3`.
pub fn parse_backend_spec(s: &str) -> Result<WeightedBackend, String> {
    let (addr, weight) = match s.rsplit_once('=') {
        Some((a, w)) => {
            let w = w.parse::<u32>().map_err(|_| {
                format!("backend {s:?}: weight {w:?} is not a non-negative integer")
            })?;
            (a, w)
        }
        None => (s, 1),
    };
    let addr: SocketAddr = addr
        .parse()
        .map_err(|_| format!("backend {s:?}: {addr:?} is not ADDR:PORT (IPv6 as [ADDR]:PORT)"))?;
    if addr.port() == 0 {
        return Err(format!("backend {s:?}: port 0 is not a valid backend port"));
    }
    Ok(WeightedBackend { addr, weight })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> WeightedBackend {
        parse_backend_spec(s).unwrap()
    }

    #[test]
    fn primes() {
        assert!(is_prime(251) && is_prime(16381) && is_prime(65537) && is_prime(131071));
        assert!(!is_prime(1) && !is_prime(16383) && !is_prime(65536));
    }

    #[test]
    fn table_size_errors() {
        let bs = [b("10.0.0.1:80")];
        assert_eq!(build(&bs, 65536), Err(MaglevError::NotPrime(65536)));
        assert_eq!(build(&bs, 241), Err(MaglevError::OutOfRange(241)));
        assert_eq!(build(&bs, 131_101), Err(MaglevError::OutOfRange(131_101)));
        // Prime, but larger than the datapath's table.
        assert_eq!(build(&bs, 131_071), Err(MaglevError::OutOfRange(131_071)));
        assert!(build(&bs, 65537).is_ok());
    }

    #[test]
    fn backend_errors() {
        assert_eq!(build(&[], 251), Err(MaglevError::NoBackends));
        assert_eq!(
            build(&[b("10.0.0.1:80"), b("10.0.0.1:80=3")], 251),
            Err(MaglevError::Duplicate("10.0.0.1:80".parse().unwrap()))
        );
        assert_eq!(
            build(&[b("10.0.0.1:80=0")], 251),
            Err(MaglevError::AllDrained)
        );
    }

    #[test]
    fn spec_errors_are_specific() {
        assert!(parse_backend_spec("10.0.0.1")
            .unwrap_err()
            .contains("not ADDR:PORT"));
        assert!(parse_backend_spec("10.0.0.300:80")
            .unwrap_err()
            .contains("not ADDR:PORT"));
        assert!(parse_backend_spec("10.0.0.1:80=x")
            .unwrap_err()
            .contains("weight \"x\""));
        assert!(parse_backend_spec("10.0.0.1:80=-1")
            .unwrap_err()
            .contains("weight"));
        assert!(parse_backend_spec("10.0.0.1:0")
            .unwrap_err()
            .contains("port 0"));
        assert_eq!(parse_backend_spec("[fd00::1]:443=3").unwrap().weight, 3);
    }

    /// A fixed table, so a change to the hash or the fill order (which would break the
    /// agreement between nodes of different versions) cannot pass unnoticed.
    #[test]
    fn golden_table_prefix() {
        let t = build(&[b("10.0.0.1:80"), b("10.0.0.2:80"), b("10.0.0.3:80")], 251).unwrap();
        let counts = slot_counts(&t, 3);
        assert_eq!(counts.iter().sum::<u32>(), 251);
        assert!(counts.iter().all(|&c| (83..=84).contains(&c)), "{counts:?}");
        let golden = build(&[b("10.0.0.3:80"), b("10.0.0.1:80"), b("10.0.0.2:80")], 251).unwrap();
        // golden lists 10.0.0.3, .1, .2; map its indices onto t's order (.1, .2, .3).
        let remap = [2u32, 0, 1];
        assert_eq!(
            t,
            golden
                .iter()
                .map(|&i| remap[i as usize])
                .collect::<Vec<_>>()
        );
        // Recorded from this implementation: nodes running other versions must agree.
        assert_eq!(t[..16], [2, 0, 0, 2, 2, 0, 0, 0, 1, 2, 2, 2, 2, 0, 1, 1]);
    }

    fn spread(weights: &[u32], m: u32) -> Vec<u32> {
        let bs: Vec<WeightedBackend> = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| WeightedBackend {
                addr: SocketAddr::from(([10, 1, (i >> 8) as u8, i as u8], 80)),
                weight: w,
            })
            .collect();
        slot_counts(&build(&bs, m).unwrap(), bs.len())
    }

    /// Seen before the credit scheme: 20 backends of weight 1000 left 4 without a slot,
    /// and 3 of weight 20000 sent every flow to one.
    #[test]
    fn large_equal_weights_spread_like_weight_one() {
        for (n, w) in [(20usize, 1000u32), (3, 20_000), (7, u32::MAX)] {
            let counts = spread(&vec![w; n], 16381);
            assert_eq!(counts, spread(&vec![1; n], 16381), "n={n} w={w}");
            let max = *counts.iter().max().unwrap() as f64;
            let avg = 16381.0 / n as f64;
            assert!(max / avg <= 1.01, "n={n} w={w}: {counts:?}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Shares follow the weights for any weights check-config accepts (u32), small
        /// or huge: each active backend's slots are within 1% of M plus 2% of its ideal
        /// share of it, and a backend of weight 0 gets none.
        #[test]
        fn shares_follow_weights(
            weights in proptest::collection::vec(
                proptest::prop_oneof![0u32..4, 1u32..100, 1000u32..1_000_000, (u32::MAX - 1000)..=u32::MAX],
                1..24,
            )
        ) {
            proptest::prop_assume!(weights.iter().any(|&w| w > 0));
            let m = 16381u32;
            let counts = spread(&weights, m);
            proptest::prop_assert_eq!(counts.iter().sum::<u32>(), m);
            let total: f64 = weights.iter().map(|&w| w as f64).sum();
            for (&w, &c) in weights.iter().zip(&counts) {
                let ideal = m as f64 * w as f64 / total;
                if w == 0 {
                    proptest::prop_assert_eq!(c, 0);
                } else {
                    proptest::prop_assert!(
                        (c as f64 - ideal).abs() <= 0.01 * m as f64 + 0.02 * ideal,
                        "weight {} got {} slots, ideal {:.1} ({:?} -> {:?})", w, c, ideal, weights, counts
                    );
                }
            }
        }
    }
}
