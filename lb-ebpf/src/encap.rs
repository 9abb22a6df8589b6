//! Encapsulation helpers, as Katran's encap_helpers.h: room made or taken in front of
//! the packet, and the outer IP headers written into it. dsr's send (tunnel.rs), its
//! ICMP too-big answer (tunnel.rs) and the backend's decapsulation (decap.rs) use them.

use aya_ebpf::programs::XdpContext;
use lb_common::{flow_hash, Addr, FAMILY_V4};

use crate::{
    csum,
    mem::{self, bytes_mut, load, put_addr, store},
    packet::{
        Packet, ETH_LEN, ETH_P_IP, ETH_P_IPV6, IPPROTO_IPIP, IPPROTO_IPV6, IPV4_HDR_LEN,
        IPV6_HDR_LEN,
    },
};

/// The TTL or hop limit of the headers xlb writes.
pub const OUTER_TTL: u8 = 64;

/// Bytes the outer header adds for a packet of this family.
#[inline(always)]
pub fn overhead(family: u8) -> u16 {
    if family == FAMILY_V4 {
        IPV4_HDR_LEN as u16
    } else {
        IPV6_HDR_LEN as u16
    }
}

/// The outer protocol for a packet of this family: IP-in-IP or IPv6-in-IPv6.
#[inline(always)]
pub fn outer_proto(family: u8) -> u8 {
    if family == FAMILY_V4 {
        IPPROTO_IPIP
    } else {
        IPPROTO_IPV6
    }
}

/// Moves the Ethernet header `delta` bytes towards the end of the frame (positive) or
/// the start (negative) after the frame's start moved by -delta: the header stays
/// first, and the space freed or made is right after it.
#[inline(always)]
pub fn resize_head(ctx: &XdpContext, delta: i32) -> Option<()> {
    let eth = load::<[u8; ETH_LEN]>(ctx, 0)?;
    mem::adjust_head(ctx, delta)?;
    store(ctx, 0, eth)
}

/// An IPv4 header without options, checksum included. `df`: the don't-fragment bit.
#[inline(always)]
pub fn ipv4_header(h: &mut [u8; IPV4_HDR_LEN], tot_len: u16, df: bool, proto: u8) {
    let tot = tot_len.to_be_bytes();
    *h = [
        0x45,
        0,
        tot[0],
        tot[1],
        0,
        0,
        if df { 0x40 } else { 0 },
        0,
        OUTER_TTL,
        proto,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
    ];
}

/// The addresses of an IPv4 header `ipv4_header` wrote, and then its checksum.
#[inline(always)]
pub fn ipv4_addresses(h: &mut [u8; IPV4_HDR_LEN], src: u32, dst: u32) {
    h[12..16].copy_from_slice(&src.to_ne_bytes());
    h[16..20].copy_from_slice(&dst.to_ne_bytes());
    let check = csum::finish(csum::sum_words(h));
    h[10..12].copy_from_slice(&check.to_ne_bytes());
}

/// An IPv6 header: `label` the flow label (20 bits), `payload_len` what follows it.
#[inline(always)]
pub fn ipv6_header(
    h: &mut [u8; IPV6_HDR_LEN],
    label: u32,
    payload_len: u16,
    next: u8,
    (src, dst): (&Addr, &Addr),
) {
    let len = payload_len.to_be_bytes();
    h[0] = 0x60 | (label >> 16) as u8;
    h[1] = (label >> 8) as u8;
    h[2] = label as u8;
    h[3] = 0;
    h[4] = len[0];
    h[5] = len[1];
    h[6] = next;
    h[7] = OUTER_TTL;
    put_addr(&mut h[8..24], src);
    put_addr(&mut h[24..40], dst);
}

/// Puts the outer header in front of the packet: `src` → `dst`, IP-in-IP for IPv4,
/// IPv6-in-IPv6 for IPv6. The inner packet is not touched (not even its TTL): the
/// backend sees what the client sent. None if the frame has no headroom.
#[inline(always)]
pub fn encapsulate(ctx: &XdpContext, pkt: &Packet, src: &Addr, dst: &Addr) -> Option<()> {
    let family = pkt.key.family;
    let inner_len = pkt.ip_len;
    if family == FAMILY_V4 {
        resize_head(ctx, -(IPV4_HDR_LEN as i32))?;
        let h = bytes_mut::<IPV4_HDR_LEN>(ctx, ETH_LEN)?;
        // DF: the client's PMTUD sees the path.
        ipv4_header(h, inner_len + IPV4_HDR_LEN as u16, true, IPPROTO_IPIP);
        ipv4_addresses(h, src[0], dst[0]);
        let eth = bytes_mut::<2>(ctx, 12)?;
        *eth = ETH_P_IP.to_be_bytes();
    } else {
        resize_head(ctx, -(IPV6_HDR_LEN as i32))?;
        let h = bytes_mut::<IPV6_HDR_LEN>(ctx, ETH_LEN)?;
        // The flow label carries the flow's hash: ECMP on the way to the backend then
        // spreads flows without looking inside.
        let label = flow_hash(&pkt.key, false) & 0x000f_ffff;
        ipv6_header(h, label, inner_len, IPPROTO_IPV6, (src, dst));
        let eth = bytes_mut::<2>(ctx, 12)?;
        *eth = ETH_P_IPV6.to_be_bytes();
    }
    Some(())
}

/// Takes the outer header (`outer_len` bytes after Ethernet) off, and names the inner
/// packet's type (`inner_type`, host order) in the Ethernet header.
#[inline(always)]
pub fn decapsulate(ctx: &XdpContext, outer_len: usize, inner_type: u16) -> Option<()> {
    resize_head(ctx, outer_len as i32)?;
    store(ctx, 12, inner_type.to_be())
}
