//! The flow hash: one function over the 5-tuple, called by the XDP program to pick a
//! Maglev slot and by userspace to predict that pick.
//!
//! It is a fixed-round mix over the ten 32-bit words of a [`FlowKey`] (murmur3's
//! finaliser per word): no loops with data-dependent bounds, no tables, so the
//! verifier accepts it and both sides get bit-identical results.

use crate::maps::{Addr, FlowKey, VipFilterWord, VIP_FILTER_WORDS, VIP_FILTER_WORD_BITS};

/// Part of the contract between nodes: every agent and every datapath must use the
/// same seed, or ECMP-spread flows would land on different backends per node.
pub const FLOW_HASH_SEED: u32 = 0x5851_f42d;

#[inline(always)]
const fn mix(mut h: u32, w: u32) -> u32 {
    let mut k = w.wrapping_mul(0xcc9e_2d51);
    k = k.rotate_left(15);
    k = k.wrapping_mul(0x1b87_3593);
    h ^= k;
    h = h.rotate_left(13);
    h.wrapping_mul(5).wrapping_add(0xe654_6b64)
}

#[inline(always)]
const fn fmix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Hash of a flow as the client sent it (client → VIP). Addresses and ports are taken
/// as their in-memory (network order) words, so the value is the same on any host.
///
/// With `client_only` set (session affinity on the client address) the destination
/// and ports are left out, so every flow of one client hashes alike.
#[inline(always)]
pub const fn flow_hash(key: &FlowKey, client_only: bool) -> u32 {
    let mut h = FLOW_HASH_SEED;
    h = mix(h, key.src[0]);
    h = mix(h, key.src[1]);
    h = mix(h, key.src[2]);
    h = mix(h, key.src[3]);
    if !client_only {
        h = mix(h, key.dst[0]);
        h = mix(h, key.dst[1]);
        h = mix(h, key.dst[2]);
        h = mix(h, key.dst[3]);
        h = mix(h, (key.sport as u32) | ((key.dport as u32) << 16));
        h = mix(h, key.proto as u32);
    }
    fmix(h ^ 40)
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
