//! The flow hash: one function over the 5-tuple, called by the XDP program to pick a
//! Maglev slot and by userspace to predict that pick.
//!
//! It is a fixed-round mix over the ten 32-bit words of a [`FlowKey`] (murmur3's
//! finaliser per word): no loops with data-dependent bounds, no tables, so the
//! verifier accepts it and both sides get bit-identical results.

use crate::maps::{Addr, FlowKey, VIP_FILTER_WORDS};

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
#[inline(always)]
pub const fn vip_filter_bit(vip: &Addr, port: u16, proto: u8) -> u32 {
    let mut h = FLOW_HASH_SEED;
    h = mix(h, vip[0]);
    h = mix(h, vip[1]);
    h = mix(h, vip[2]);
    h = mix(h, vip[3]);
    h = mix(h, (port as u32) | ((proto as u32) << 16));
    fmix(h) & (VIP_FILTER_WORDS * 64 - 1)
}

/// The word of XLB_VIP_FILTER that holds `bit`, and the bit's mask in it.
#[inline(always)]
pub const fn vip_filter_slot(bit: u32) -> (u32, u64) {
    (bit / 64, 1 << (bit % 64))
}
