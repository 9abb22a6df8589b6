//! L2 announcement: on the interfaces the agent names, ARP requests (IPv4) and
//! neighbour solicitations (IPv6) for a VIP this node announces are answered here, in
//! XDP, with the interface's MAC address, and sent back out (XDP_TX). The agent keeps
//! XLB_L2_VIPS: (VIP, interface) → the MAC to answer with.
//!
//! A stage of its own after the parser, for what is not TCP or UDP: it looks at what
//! the parser made of the frame (not IP, or ICMPv6) and answers, or leaves the packet
//! to the ICMP stages.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{StatIndex, FAMILY_V4, FAMILY_V6};

use crate::{
    csum,
    maps::{L2_VIPS, SCRATCH},
    mem::{bytes_mut, copied, load, this_cpu, truncate},
    packet::{Packet, Verdict, ETH_LEN, IPPROTO_ICMPV6},
    parse::Other,
};

const ARP_LEN: usize = 28;
const ICMPV6_NS: u8 = 135;
const ICMPV6_NA: u8 = 136;
const ND_LEN: usize = 24;
const OPT_TARGET_LL: u8 = 2;

/// An ARP request or a neighbour solicitation for a VIP announced on this interface
/// is answered (XDP_TX). None: not one; the packet is untouched.
#[inline(always)]
pub fn answer(ctx: &XdpContext, other: &Other) -> Option<Verdict> {
    let answered = match other {
        Other::Icmp(pkt) if pkt.key.proto == IPPROTO_ICMPV6 => neighbour_solicitation(ctx, pkt),
        Other::Pass(StatIndex::PassNotIp) => arp(ctx),
        _ => None,
    };
    answered.map(|()| (xdp_action::XDP_TX, StatIndex::L2Answered))
}

/// The MAC to answer with for the VIP at `addr` (4 network-order words from the
/// packet at `off`, 1 for IPv4) on the ingress interface. The key is built in the
/// per-CPU scratch: the pipeline's stack has no room left for it.
#[inline(always)]
fn mac_for(ctx: &XdpContext, off: usize, family: u8) -> Option<[u8; 6]> {
    let key = &mut this_cpu(&SCRATCH, 0)?.l2;
    key.addr = [0; 4];
    if family == FAMILY_V4 {
        key.addr[0] = load::<u32>(ctx, off)?;
    } else {
        key.addr = load::<[u32; 4]>(ctx, off)?;
    }
    key.ifindex = ctx.ingress_ifindex() as u32;
    key.family = family as u32;
    copied(&L2_VIPS, key).map(|v| v.mac)
}

/// An ARP request for an announced VIP becomes the reply, in place. None: not one.
#[inline(always)]
fn arp(ctx: &XdpContext) -> Option<()> {
    let eth_type = load::<[u8; 2]>(ctx, 12)?;
    if eth_type[0] != 0x08 || eth_type[1] != 0x06 {
        return None;
    }
    // Ethernet, IPv4, a request.
    let hdr = load::<u64>(ctx, ETH_LEN)?;
    if hdr != u64::from_ne_bytes([0, 1, 0x08, 0x00, 6, 4, 0, 1]) {
        return None;
    }
    let mac = mac_for(ctx, ETH_LEN + 24, FAMILY_V4)?;
    let a = bytes_mut::<ARP_LEN>(ctx, ETH_LEN)?;
    // A reply; sender ↔ target: the requester becomes the target, the VIP the sender.
    a[7] = 2;
    let mut i = 0;
    while i < 10 {
        a.swap(8 + i, 18 + i);
        i += 1;
    }
    a[8..14].copy_from_slice(&mac);
    let eth = bytes_mut::<12>(ctx, 0)?;
    let mut i = 0;
    while i < 6 {
        eth[i] = eth[6 + i];
        eth[6 + i] = mac[i];
        i += 1;
    }
    Some(())
}

/// A neighbour solicitation for an announced VIP becomes the advertisement (solicited,
/// override, with the target link-layer address option), from the VIP back to the
/// solicitor (to all nodes for duplicate address detection). None: not one.
#[inline(always)]
fn neighbour_solicitation(ctx: &XdpContext, pkt: &Packet) -> Option<()> {
    let k = &pkt.key;
    // RFC 4861: only with hop limit 255 (from the link itself), no extension headers.
    if k.family != FAMILY_V6 || pkt.ttl != 255 || pkt.l4_off != ETH_LEN + 40 {
        return None;
    }
    let ty = load::<[u8; 2]>(ctx, pkt.l4_off)?;
    if ty[0] != ICMPV6_NS || ty[1] != 0 {
        return None;
    }
    let mac = mac_for(ctx, pkt.l4_off + 8, FAMILY_V6)?;
    // From an unspecified source (DAD): to all nodes, and not "solicited".
    let dad = k.src == [0; 4];
    // Exactly Ethernet + IPv6 + NA + one 8-byte option. The head stays where it is, so
    // the solicitation's fields are rearranged in place: no copies on the stack, which
    // the pipeline has no room left for.
    truncate(ctx, ETH_LEN + 40 + ND_LEN + 8)?;
    let f = bytes_mut::<{ ETH_LEN + 40 + ND_LEN + 8 }>(ctx, 0)?;
    const SRC: usize = ETH_LEN + 8;
    const DST: usize = ETH_LEN + 24;
    const ICMP: usize = ETH_LEN + 40;
    const TARGET: usize = ICMP + 8;
    let mut i = 0;
    while i < 16 {
        // Destination: the solicitor (or all nodes); source: the VIP (the target).
        f[DST + i] = if dad { 0 } else { f[SRC + i] };
        f[SRC + i] = f[TARGET + i];
        i += 1;
    }
    if dad {
        f[DST] = 0xff;
        f[DST + 1] = 2;
        f[DST + 15] = 1;
    }
    let mut i = 0;
    while i < 6 {
        f[i] = if dad {
            [0x33, 0x33, 0, 0, 0, 1][i]
        } else {
            f[6 + i]
        };
        f[6 + i] = mac[i];
        f[TARGET + 18 + i] = mac[i];
        i += 1;
    }
    f[12] = 0x86;
    f[13] = 0xdd;
    f[ETH_LEN] = 0x60;
    f[ETH_LEN + 1] = 0;
    f[ETH_LEN + 2] = 0;
    f[ETH_LEN + 3] = 0;
    f[ETH_LEN + 4] = 0;
    f[ETH_LEN + 5] = (ND_LEN + 8) as u8;
    f[ETH_LEN + 6] = IPPROTO_ICMPV6;
    f[ETH_LEN + 7] = 255;
    f[ICMP] = ICMPV6_NA;
    f[ICMP + 1] = 0;
    f[ICMP + 2] = 0;
    f[ICMP + 3] = 0;
    // Override, and solicited unless DAD.
    f[ICMP + 4] = if dad { 0x20 } else { 0x60 };
    f[ICMP + 5] = 0;
    f[ICMP + 6] = 0;
    f[ICMP + 7] = 0;
    f[TARGET + 16] = OPT_TARGET_LL;
    f[TARGET + 17] = 1;
    // The checksum over the pseudo-header (source, destination, length, next header)
    // and the message.
    let pseudo = csum::sum_pseudo_tail((ND_LEN + 8) as u16, IPPROTO_ICMPV6);
    let summed = bytes_mut::<{ ICMP + ND_LEN + 8 - SRC }>(ctx, SRC)?;
    let s = csum::sum_bytes(summed) + pseudo;
    let check = csum::finish(s);
    f[ICMP + 2..ICMP + 4].copy_from_slice(&check.to_ne_bytes());
    Some(())
}
