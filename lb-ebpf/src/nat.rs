//! Stage 4: address and port translation, with incremental checksum updates
//! (RFC 1624) and the SNAT port allocator.
//!
//! All words are handled as they sit in memory (network byte order loaded natively):
//! the one's-complement sum is byte-order independent as long as every operand is
//! loaded the same way.

use aya_ebpf::bindings::BPF_NOEXIST;
use lb_common::{
    flow_hash, Addr, DatapathConfig, FlowKey, ReverseNat, FAMILY_V4, PROTO_TCP, PROTO_UDP,
};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};

use crate::{
    maps::REVERSE_NAT,
    mem::{load, store},
    parse::{Packet, ETH_LEN},
};

/// How many ports the allocator tries before it gives up (and counts a drop).
const PORT_PROBES: u32 = 8;

#[inline(always)]
fn fold(mut s: u64) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// The checksum after replacing 32-bit words `from` with `to` (RFC 1624, eqn. 3).
#[inline(always)]
fn csum_replace32(check: u16, from: &[u32; 4], to: &[u32; 4], words: usize) -> u16 {
    let mut s = !check as u64;
    let mut i = 0;
    while i < 4 {
        if i < words {
            s += (!from[i]) as u64 + to[i] as u64;
        }
        i += 1;
    }
    !fold(s)
}

#[inline(always)]
fn csum_replace16(check: u16, from: u16, to: u16) -> u16 {
    !fold(!check as u64 + (!from) as u64 + to as u64)
}

/// What a packet is rewritten to.
pub struct Rewrite {
    pub src: Addr,
    pub dst: Addr,
    /// Network byte order.
    pub sport: u16,
    pub dport: u16,
}

/// Rewrites addresses and ports, decrements TTL / hop limit, and fixes the IPv4 header
/// checksum and the TCP/UDP checksum. None if the headers are no longer reachable.
#[inline(always)]
pub fn rewrite(ctx: &aya_ebpf::programs::XdpContext, pkt: &Packet, to: &Rewrite) -> Option<()> {
    let k = &pkt.key;
    let words = if k.family == FAMILY_V4 { 1 } else { 4 };
    if k.family == FAMILY_V4 {
        let mut ip = load::<Ipv4Hdr>(ctx, ETH_LEN)?;
        let mut check = u16::from_ne_bytes(ip.check);
        let old_ttl = u16::from_ne_bytes([ip.ttl, ip.proto]);
        ip.ttl -= 1;
        check = csum_replace16(check, old_ttl, u16::from_ne_bytes([ip.ttl, ip.proto]));
        check = csum_replace32(check, &k.src, &to.src, 1);
        check = csum_replace32(check, &k.dst, &to.dst, 1);
        ip.check = check.to_ne_bytes();
        ip.src_addr = to.src[0].to_ne_bytes();
        ip.dst_addr = to.dst[0].to_ne_bytes();
        store(ctx, ETH_LEN, ip)?;
    } else {
        let mut ip = load::<Ipv6Hdr>(ctx, ETH_LEN)?;
        ip.hop_limit -= 1;
        ip.src_addr = addr_bytes(&to.src);
        ip.dst_addr = addr_bytes(&to.dst);
        store(ctx, ETH_LEN, ip)?;
    }
    // Ports, then the transport checksum (it covers the pseudo-header addresses too).
    store(ctx, pkt.l4_off, [to.sport, to.dport])?;
    let check_off = match k.proto {
        PROTO_TCP => pkt.l4_off + 16,
        _ => pkt.l4_off + 6,
    };
    let old = load::<u16>(ctx, check_off)?;
    // An IPv4 UDP checksum of 0 means "none" and must stay 0.
    if k.proto == PROTO_UDP && k.family == FAMILY_V4 && old == 0 {
        return Some(());
    }
    let mut check = csum_replace32(old, &k.src, &to.src, words);
    check = csum_replace32(check, &k.dst, &to.dst, words);
    check = csum_replace16(check, k.sport, to.sport);
    check = csum_replace16(check, k.dport, to.dport);
    if k.proto == PROTO_UDP && check == 0 {
        check = 0xffff;
    }
    store(ctx, check_off, check)
}

#[inline(always)]
fn addr_bytes(a: &Addr) -> [u8; 16] {
    let (w0, w1, w2, w3) = (
        a[0].to_ne_bytes(),
        a[1].to_ne_bytes(),
        a[2].to_ne_bytes(),
        a[3].to_ne_bytes(),
    );
    [
        w0[0], w0[1], w0[2], w0[3], w1[0], w1[1], w1[2], w1[3], w2[0], w2[1], w2[2], w2[3], w3[0],
        w3[1], w3[2], w3[3],
    ]
}

/// Picks a free SNAT source port towards `backend` and claims it by inserting the
/// reverse entry with BPF_NOEXIST, so two flows can never share a reply 5-tuple.
/// Probes are hashed from the flow and bounded. Returns the port in network order.
#[inline(always)]
pub fn alloc_port(
    key: &FlowKey,
    reply_src: Addr,
    reply_sport: u16,
    snat: Addr,
    cfg: &DatapathConfig,
    rev: &ReverseNat,
) -> Option<u16> {
    let min = cfg.snat_port_min as u32;
    let max = cfg.snat_port_max as u32;
    if max < min {
        return None;
    }
    let range = max - min + 1;
    let h = flow_hash(key, false);
    let mut i = 0;
    while i < PORT_PROBES {
        let port = (min + h.wrapping_add(i.wrapping_mul(0x9e37_79b1)) % range) as u16;
        let rkey = FlowKey {
            src: reply_src,
            dst: snat,
            sport: reply_sport,
            dport: port.to_be(),
            proto: key.proto,
            family: key.family,
            _pad: [0; 2],
        };
        if REVERSE_NAT.insert(rkey, rev, BPF_NOEXIST as u64).is_ok() {
            return Some(port.to_be());
        }
        i += 1;
    }
    None
}
