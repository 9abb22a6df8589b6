//! Stage 4 for `dsr`: the client's packet, unchanged, inside an outer IP header to the
//! backend (IP-in-IP for IPv4, IPv6-in-IPv6 for IPv6); an ICMP "too big" back to the
//! client when the encapsulated packet would not fit the path; and, on the backend's
//! side (`decap`), stripping the outer header again.

use aya_ebpf::{
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{flow_hash, Addr, StatIndex, FAMILY_V4};

use crate::{
    maps::SCRATCH,
    mem::{bytes_mut, load, store},
    parse::{Packet, ETH_LEN, ETH_P_IP, ETH_P_IPV6, IPPROTO_ICMP, IPPROTO_ICMPV6},
};

pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_IPV6: u8 = 41;
const IPV4_HDR_LEN: usize = 20;
const IPV6_HDR_LEN: usize = 40;
const ICMP_HDR_LEN: usize = 8;
/// An ICMP error quotes the IPv4 header (no options) and 8 bytes of its payload, and
/// for IPv6 the fixed header and 8 bytes; enough for the sender to find its socket.
const QUOTE_V4: usize = IPV4_HDR_LEN + 8;
const QUOTE_V6: usize = IPV6_HDR_LEN + 8;
const OUTER_TTL: u8 = 64;
const BPF_FIB_LKUP_RET_NOT_FWDED: i64 = 4;
const BPF_FIB_LKUP_RET_FWD_DISABLED: i64 = 5;

/// Bytes the outer header adds for a packet of this family.
#[inline(always)]
pub fn overhead(family: u8) -> u16 {
    if family == FAMILY_V4 {
        IPV4_HDR_LEN as u16
    } else {
        IPV6_HDR_LEN as u16
    }
}

/// The one's-complement sum of `N` bytes as 16-bit words (in memory order).
#[inline(always)]
pub fn sum_words<const N: usize>(b: &[u8; N]) -> u64 {
    let mut s = 0u64;
    let mut i = 0;
    while i + 1 < N {
        s += u16::from_ne_bytes([b[i], b[i + 1]]) as u64;
        i += 2;
    }
    s
}

#[inline(always)]
fn sum_addr(a: &Addr, words: usize) -> u64 {
    let mut s = 0u64;
    let mut i = 0;
    while i < 4 {
        if i < words {
            s += (a[i] & 0xffff) as u64 + (a[i] >> 16) as u64;
        }
        i += 1;
    }
    s
}

/// The checksum field for a one's-complement sum.
#[inline(always)]
fn fold(s: u64) -> u16 {
    !crate::nat::fold(s)
}

/// Moves the Ethernet header `delta` bytes towards the end of the frame (positive) or
/// the start (negative) after the frame's start moved by -delta: the header stays
/// first, and the space freed or made is right after it.
#[inline(always)]
fn resize_head(ctx: &XdpContext, delta: i32) -> Option<()> {
    let eth = load::<[u8; ETH_LEN]>(ctx, 0)?;
    // SAFETY: a plain helper call; every pointer into the frame is re-derived after it.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, delta) } != 0 {
        return None;
    }
    store(ctx, 0, eth)
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
        let tot = (inner_len + IPV4_HDR_LEN as u16).to_be_bytes();
        *h = [
            0x45,
            0,
            tot[0],
            tot[1],
            0,
            0,
            0x40,
            0, // DF: the client's PMTUD sees the path
            OUTER_TTL,
            IPPROTO_IPIP,
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
        h[12..16].copy_from_slice(&src[0].to_ne_bytes());
        h[16..20].copy_from_slice(&dst[0].to_ne_bytes());
        let check = fold(sum_words(h));
        h[10..12].copy_from_slice(&check.to_ne_bytes());
        let eth = bytes_mut::<2>(ctx, 12)?;
        *eth = ETH_P_IP.to_be_bytes();
    } else {
        resize_head(ctx, -(IPV6_HDR_LEN as i32))?;
        let h = bytes_mut::<IPV6_HDR_LEN>(ctx, ETH_LEN)?;
        // The flow label carries the flow's hash: ECMP on the way to the backend then
        // spreads flows without looking inside.
        let label = flow_hash(&pkt.key, false) & 0x000f_ffff;
        let len = inner_len.to_be_bytes();
        h[0] = 0x60 | (label >> 16) as u8;
        h[1] = (label >> 8) as u8;
        h[2] = label as u8;
        h[3] = 0;
        h[4] = len[0];
        h[5] = len[1];
        h[6] = IPPROTO_IPV6;
        h[7] = OUTER_TTL;
        crate::nat::put_addr(&mut h[8..24], src);
        crate::nat::put_addr(&mut h[24..40], dst);
        let eth = bytes_mut::<2>(ctx, 12)?;
        *eth = ETH_P_IPV6.to_be_bytes();
    }
    Some(())
}

/// Turns the client's packet into ICMP fragmentation-needed (IPv4) or packet-too-big
/// (IPv6) from the VIP back to the client, announcing `mtu` (what is left for the
/// client's packet once encapsulated), and sends it back out where it came from. The
/// error quotes the start of the packet, which is already in place after the new
/// headers. None (the caller drops) for IPv4 with options.
#[inline(always)]
pub fn too_big(ctx: &XdpContext, pkt: &Packet, mtu: u16) -> Option<()> {
    let k = &pkt.key;
    let eth = load::<[u8; 12]>(ctx, 0)?;
    // The reply goes back to whoever sent the packet: swap the MAC addresses.
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&eth[6..]);
    macs[6..].copy_from_slice(&eth[..6]);
    if k.family == FAMILY_V4 {
        if pkt.l4_off != ETH_LEN + IPV4_HDR_LEN {
            return None;
        }
        const HDRS: usize = IPV4_HDR_LEN + ICMP_HDR_LEN;
        resize_head(ctx, -(HDRS as i32))?;
        let keep = (ETH_LEN + HDRS + QUOTE_V4) as i32;
        let len = (ctx.data_end() - ctx.data()) as i32;
        // SAFETY: a plain helper call; pointers are re-derived after it.
        if unsafe { bpf_xdp_adjust_tail(ctx.ctx, keep - len) } != 0 {
            return None;
        }
        store(ctx, 0, macs)?;
        let icmp = bytes_mut::<{ ICMP_HDR_LEN + QUOTE_V4 }>(ctx, ETH_LEN + IPV4_HDR_LEN)?;
        let m = mtu.to_be_bytes();
        icmp[..8].copy_from_slice(&[3, 4, 0, 0, 0, 0, m[0], m[1]]);
        let check = fold(sum_words(icmp));
        icmp[2..4].copy_from_slice(&check.to_ne_bytes());
        let h = bytes_mut::<IPV4_HDR_LEN>(ctx, ETH_LEN)?;
        let tot = ((HDRS + QUOTE_V4) as u16).to_be_bytes();
        *h = [
            0x45,
            0,
            tot[0],
            tot[1],
            0,
            0,
            0,
            0,
            OUTER_TTL,
            IPPROTO_ICMP,
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
        h[12..16].copy_from_slice(&k.dst[0].to_ne_bytes());
        h[16..20].copy_from_slice(&k.src[0].to_ne_bytes());
        let check = fold(sum_words(h));
        h[10..12].copy_from_slice(&check.to_ne_bytes());
    } else {
        const HDRS: usize = IPV6_HDR_LEN + ICMP_HDR_LEN;
        resize_head(ctx, -(HDRS as i32))?;
        let keep = (ETH_LEN + HDRS + QUOTE_V6) as i32;
        let len = (ctx.data_end() - ctx.data()) as i32;
        // SAFETY: a plain helper call; pointers are re-derived after it.
        if unsafe { bpf_xdp_adjust_tail(ctx.ctx, keep - len) } != 0 {
            return None;
        }
        store(ctx, 0, macs)?;
        let payload = (ICMP_HDR_LEN + QUOTE_V6) as u16;
        let icmp = bytes_mut::<{ ICMP_HDR_LEN + QUOTE_V6 }>(ctx, ETH_LEN + IPV6_HDR_LEN)?;
        let m = (mtu as u32).to_be_bytes();
        icmp[..8].copy_from_slice(&[2, 0, 0, 0, m[0], m[1], m[2], m[3]]);
        // The pseudo-header: source (the VIP), destination (the client), length and
        // next header.
        let pseudo = sum_addr(&k.dst, 4)
            + sum_addr(&k.src, 4)
            + u16::from_ne_bytes(payload.to_be_bytes()) as u64
            + u16::from_ne_bytes((IPPROTO_ICMPV6 as u16).to_be_bytes()) as u64;
        let check = fold(sum_words(icmp) + pseudo);
        icmp[2..4].copy_from_slice(&check.to_ne_bytes());
        let h = bytes_mut::<IPV6_HDR_LEN>(ctx, ETH_LEN)?;
        let len = payload.to_be_bytes();
        h[..8].copy_from_slice(&[0x60, 0, 0, 0, len[0], len[1], IPPROTO_ICMPV6, OUTER_TTL]);
        crate::nat::put_addr(&mut h[8..24], &k.dst);
        crate::nat::put_addr(&mut h[24..40], &k.src);
    }
    Some(())
}

/// The backend's side of dsr: an IP-in-IP or IPv6-in-IPv6 packet addressed to this
/// host loses its outer header, and the inner packet goes to the kernel. None: not
/// such a packet (it goes through the pipeline as any other).
#[inline(always)]
pub fn decapsulate(ctx: &XdpContext) -> Option<StatIndex> {
    let eth_type = u16::from_be(load::<u16>(ctx, 12)?);
    let (family, outer_len, inner, src, dst) = if eth_type == ETH_P_IP {
        let h = load::<[u8; IPV4_HDR_LEN]>(ctx, ETH_LEN)?;
        // Options or fragments: left to the kernel.
        if h[0] != 0x45 || u16::from_be_bytes([h[6], h[7]]) & 0x3fff != 0 {
            return None;
        }
        let src = [u32::from_ne_bytes([h[12], h[13], h[14], h[15]]), 0, 0, 0];
        let dst = [u32::from_ne_bytes([h[16], h[17], h[18], h[19]]), 0, 0, 0];
        (FAMILY_V4, IPV4_HDR_LEN, h[9], src, dst)
    } else if eth_type == ETH_P_IPV6 {
        let h = load::<[u8; 8]>(ctx, ETH_LEN)?;
        let src = load::<Addr>(ctx, ETH_LEN + 8)?;
        let dst = load::<Addr>(ctx, ETH_LEN + 24)?;
        (lb_common::FAMILY_V6, IPV6_HDR_LEN, h[6], src, dst)
    } else {
        return None;
    };
    let inner_type = match inner {
        IPPROTO_IPIP => ETH_P_IP,
        IPPROTO_IPV6 => ETH_P_IPV6,
        _ => return None,
    };
    if !is_local(ctx, family, &src, &dst) {
        return None;
    }
    resize_head(ctx, outer_len as i32)?;
    store(ctx, 12, inner_type.to_be())?;
    Some(StatIndex::PassDecapsulated)
}

/// Whether the packet is for this host, not passing through: the FIB delivers `dst`
/// locally (it would not forward it). On a host that does not forward at all (the
/// FIB says so before it looks at the route: a backend with default sysctls) every
/// packet that reaches it is for it, or dropped by the kernel anyway.
#[inline(always)]
fn is_local(ctx: &XdpContext, family: u8, src: &Addr, dst: &Addr) -> bool {
    let Some(p) = SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's scratch slot; nothing else uses it during this run.
    let p = unsafe { &mut (*p).fib };
    let rc = crate::forward::query(
        ctx,
        p,
        (family, 0),
        (src, dst),
        ctx.ingress_ifindex() as u32,
        0,
    );
    rc == BPF_FIB_LKUP_RET_NOT_FWDED || rc == BPF_FIB_LKUP_RET_FWD_DISABLED
}
