//! The flow hash: one function over the 5-tuple, called by the XDP program to pick a
//! Maglev slot and a flow-table bucket, and by userspace to predict both.
//!
//! Every packet of a balanced flow pays for it, so it is five independent 64-bit
//! multiplications (one per pair of 32-bit words of a [`FlowKey`]), added, and
//! murmur3's 64-bit finaliser: two more. The multiplications do not wait on each
//! other. It replaced ten chained murmur3 rounds (thirty multiplications), which were
//! a quarter of an established packet's own time (BENCHMARKS.md, "A cheaper flow
//! hash"). No loops, no tables: the verifier accepts it and both sides get
//! bit-identical results. The unit tests below hold it to an even spread and to
//! avalanche.

use crate::maps::{Addr, FlowKey, VipFilterWord, VIP_FILTER_WORDS, VIP_FILTER_WORD_BITS};

/// Part of the contract between nodes: every agent and every datapath must use the
/// same seed and function, or ECMP-spread flows would land on different backends per
/// node. (Changing the function is an upgrade event: docs/datapath.md, "The flow hash
/// changed".)
pub const FLOW_HASH_SEED: u32 = 0x5851_f42d;

/// Odd constants (the first is 2^64/φ; the others murmur3's and xxhash's primes).
const K: [u64; 5] = [
    0x9e37_79b9_7f4a_7c15,
    0xc2b2_ae3d_27d4_eb4f,
    0x1656_67b1_9e37_79f9,
    0x87c3_7b91_1142_53d5,
    0x4cf5_ad43_2745_937f,
];

/// Two 32-bit words as one 64-bit word.
#[inline(always)]
const fn pair(lo: u32, hi: u32) -> u64 {
    lo as u64 | (hi as u64) << 32
}

/// murmur3's fmix64: every input bit reaches every output bit.
#[inline(always)]
const fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Hash of a flow as the client sent it (client → VIP). Addresses and ports are taken
/// as their in-memory (network order) words, so the value is the same on any host.
///
/// With `client_only` set (session affinity on the client address) the destination
/// and ports are left out, so every flow of one client hashes alike.
#[inline(always)]
pub const fn flow_hash(key: &FlowKey, client_only: bool) -> u32 {
    let seed = FLOW_HASH_SEED as u64;
    // Each word pair is multiplied on its own (the products do not depend on each
    // other), and rotated apart before the sum, so that equal pairs in two places do
    // not cancel.
    let mut h = (pair(key.src[0], key.src[1]) ^ seed)
        .wrapping_mul(K[0])
        .wrapping_add(
            pair(key.src[2], key.src[3])
                .wrapping_mul(K[1])
                .rotate_left(21),
        );
    if !client_only {
        let ports = pair(
            (key.sport as u32) | ((key.dport as u32) << 16),
            key.proto as u32 | 0x100,
        );
        h = h
            .wrapping_add(
                pair(key.dst[0], key.dst[1])
                    .wrapping_mul(K[2])
                    .rotate_left(42),
            )
            .wrapping_add(
                pair(key.dst[2], key.dst[3])
                    .wrapping_mul(K[3])
                    .rotate_left(11),
            )
            .wrapping_add(ports.wrapping_mul(K[4]).rotate_left(53));
    }
    fmix64(h) as u32
}

/// The bit of XLB_VIP_FILTER for a service key's VIP, port (network order) and protocol.
/// The family is left out: an IPv4 and an IPv6 key that share words share a bit,
/// which only costs a lookup.
///
/// Every packet the program sees pays for this hash, so it is one multiplication
/// (Fibonacci hashing: the top 16 bits of the key times 2^64/φ), not five murmur
/// rounds as it was, which cost an eighth of an established packet's own time. It
/// spreads the keys a service set is made of (consecutive VIPs, IPv6 prefixes, port
/// ranges, TCP and UDP alike) over distinct bits, which random keys would not do
/// (the unit tests in dataplane.rs hold it to that). The address words are folded
/// into one, rotated apart, so IPv6 VIPs that differ in any word differ in it.
#[inline(always)]
pub const fn vip_filter_bit(vip: &Addr, port: u16, proto: u8) -> u32 {
    let a = vip[0] ^ vip[1].rotate_left(8) ^ vip[2].rotate_left(16) ^ vip[3].rotate_left(24);
    let key = ((a as u64) << 32) | ((port as u64) << 8) | proto as u64;
    (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 48) as u32
        & (VIP_FILTER_WORDS * VIP_FILTER_WORD_BITS - 1)
}

/// The word of XLB_VIP_FILTER that holds `bit`, and the bit's mask in it.
#[inline(always)]
pub const fn vip_filter_slot(bit: u32) -> (u32, VipFilterWord) {
    (
        bit / VIP_FILTER_WORD_BITS,
        1 << (bit % VIP_FILTER_WORD_BITS),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    extern crate std;
    use crate::maps::{FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP};
    use std::{vec, vec::Vec};

    fn v4(src: u32, sport: u16) -> FlowKey {
        FlowKey {
            src: [src.to_be(), 0, 0, 0],
            dst: [0xc000_020a_u32.to_be(), 0, 0, 0],
            sport: sport.to_be(),
            dport: 80u16.to_be(),
            proto: PROTO_TCP,
            family: FAMILY_V4,
            _pad: [0; 2],
        }
    }

    /// A small deterministic generator (splitmix64), for keys that are not structured.
    fn random_words(seed: &mut u64) -> u64 {
        *seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        fmix64(*seed)
    }

    fn random_key(seed: &mut u64) -> FlowKey {
        let w = [
            random_words(seed),
            random_words(seed),
            random_words(seed),
            random_words(seed),
        ];
        let p = random_words(seed);
        FlowKey {
            src: [
                w[0] as u32,
                (w[0] >> 32) as u32,
                w[1] as u32,
                (w[1] >> 32) as u32,
            ],
            dst: [
                w[2] as u32,
                (w[2] >> 32) as u32,
                w[3] as u32,
                (w[3] >> 32) as u32,
            ],
            sport: p as u16,
            dport: (p >> 16) as u16,
            proto: if p >> 40 & 1 == 0 {
                PROTO_TCP
            } else {
                PROTO_UDP
            },
            family: FAMILY_V6,
            _pad: [0; 2],
        }
    }

    /// The fullest of `buckets` bins against the mean, for `n` hashes.
    fn worst_load(hashes: impl Iterator<Item = u32>, buckets: u32) -> f64 {
        let mut bins = vec![0u32; buckets as usize];
        let mut n = 0;
        for h in hashes {
            bins[(h % buckets) as usize] += 1;
            n += 1;
        }
        *bins.iter().max().unwrap() as f64 / (n as f64 / buckets as f64)
    }

    #[test]
    fn structured_flows_spread_over_buckets_and_maglev_slots() {
        // One client, every source port; a /16 of clients on one port; both against a
        // power-of-two table (the flow table's low bits) and Maglev's prime M. A
        // uniform hash puts at most about 1.3x the mean (64 per bin) in the fullest.
        let ports = || (0..=u16::MAX).map(|p| flow_hash(&v4(0x0a00_0001, p), false));
        let clients = || (0..65_536u32).map(|i| flow_hash(&v4(0x0a01_0000 | i, 40_000), false));
        for (what, buckets) in [("power of two", 1024), ("Maglev's prime", 1021)] {
            let p = worst_load(ports(), buckets);
            let c = worst_load(clients(), buckets);
            assert!(
                p < 1.5,
                "source ports, {what}: fullest bin {p:.2}x the mean"
            );
            assert!(
                c < 1.5,
                "client addresses, {what}: fullest bin {c:.2}x the mean"
            );
        }
        // Session affinity: one hash per client, whatever its port.
        assert_eq!(flow_hash(&v4(7, 1), true), flow_hash(&v4(7, 2), true));
        assert_ne!(flow_hash(&v4(7, 1), false), flow_hash(&v4(7, 2), false));
    }

    #[test]
    fn every_input_bit_moves_every_output_bit_about_half_the_time() {
        // Flip each of the key's 296 meaningful bits in 200 random keys; each output
        // bit must change in 35-65% of the flips of each input bit: over 200 flips, a
        // fair coin lands outside that 4.2 standard deviations out. The keys are fixed,
        // so the test gives the same answer every run.
        let mut seed = 1;
        let keys: Vec<FlowKey> = (0..200).map(|_| random_key(&mut seed)).collect();
        let words = |k: &FlowKey| {
            let mut w = [0u32; 10];
            w[..4].copy_from_slice(&k.src);
            w[4..8].copy_from_slice(&k.dst);
            w[8] = k.sport as u32 | (k.dport as u32) << 16;
            w[9] = k.proto as u32;
            w
        };
        let from_words = |w: [u32; 10]| FlowKey {
            src: [w[0], w[1], w[2], w[3]],
            dst: [w[4], w[5], w[6], w[7]],
            sport: w[8] as u16,
            dport: (w[8] >> 16) as u16,
            proto: w[9] as u8,
            family: FAMILY_V6,
            _pad: [0; 2],
        };
        for word in 0..10 {
            let bits = if word == 9 { 8 } else { 32 };
            for bit in 0..bits {
                let mut changed = [0u32; 32];
                for k in &keys {
                    let mut w = words(k);
                    let before = flow_hash(&from_words(w), false);
                    w[word] ^= 1 << bit;
                    let diff = before ^ flow_hash(&from_words(w), false);
                    for (o, c) in changed.iter_mut().enumerate() {
                        *c += diff >> o & 1;
                    }
                }
                for (o, c) in changed.iter().enumerate() {
                    let share = *c as f64 / keys.len() as f64;
                    assert!(
                        (0.35..=0.65).contains(&share),
                        "input word {word} bit {bit}: output bit {o} changed in {share:.2} of flips"
                    );
                }
            }
        }
    }
}
