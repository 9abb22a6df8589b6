//! ICMP echo to a VIP: answered here, from the VIP, as Katran does, so that `ping VIP`
//! (the first thing an operator tries) works. Only for a VIP with a service that can
//! take new flows (the agent keeps XLB_VIPS: the VIPs and whether to answer), and only
//! for requests without IP options or extension headers. The request is turned into
//! the reply in place and sent back (XDP_TX).

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{StatIndex, FAMILY_V4, VIP_F_ECHO};

use crate::{
    csum::{self, Delta},
    maps::{SCRATCH, VIPS},
    mem::{bytes_mut, copied, load, this_cpu},
    packet::{Packet, Verdict, ETH_LEN, IPPROTO_ICMP, IPPROTO_ICMPV6, IPV4_HDR_LEN, IPV6_HDR_LEN},
};

const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;
const REPLY_TTL: u8 = 64;

/// Whether the VIP `pkt` is addressed to answers echo requests. The key is built in
/// per-CPU scratch (the stack has no room for it).
#[inline(always)]
fn answers(pkt: &Packet) -> bool {
    let Some(scratch) = this_cpu(&SCRATCH, 0) else {
        return false;
    };
    let key = &mut scratch.vip;
    key.addr = pkt.key.dst;
    key.family = pkt.key.family as u32;
    // Looked up from the scratch slot itself: a copy would take stack.
    copied(&VIPS, key).is_some_and(|f| f & VIP_F_ECHO != 0)
}

/// An echo request to a VIP that answers becomes the reply, in place, and is sent
/// back (XDP_TX). None: not one (the packet is then untouched).
#[inline(always)]
pub fn answer(ctx: &XdpContext, pkt: &Packet) -> Option<Verdict> {
    reply(ctx, pkt).map(|()| (xdp_action::XDP_TX, StatIndex::IcmpEchoAnswered))
}

#[inline(always)]
fn reply(ctx: &XdpContext, pkt: &Packet) -> Option<()> {
    let v4 = pkt.key.family == FAMILY_V4;
    let (request, reply, ip_len) = if v4 {
        (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY, IPV4_HDR_LEN)
    } else {
        (ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY, IPV6_HDR_LEN)
    };
    let proto = if v4 { IPPROTO_ICMP } else { IPPROTO_ICMPV6 };
    if pkt.key.proto != proto || pkt.l4_off != ETH_LEN + ip_len {
        return None;
    }
    let [ty, code, c0, c1] = load::<[u8; 4]>(ctx, pkt.l4_off)?;
    if ty != request || code != 0 || !answers(pkt) {
        return None;
    }
    // The type changes; nothing else the checksum covers does (ICMPv6's pseudo-header
    // holds the same two addresses, swapped).
    let check = Delta::new()
        .half(
            u16::from_ne_bytes([request, 0]),
            u16::from_ne_bytes([reply, 0]),
        )
        .apply(u16::from_ne_bytes([c0, c1]));
    let icmp = bytes_mut::<4>(ctx, pkt.l4_off)?;
    icmp[0] = reply;
    icmp[2..4].copy_from_slice(&check.to_ne_bytes());
    if v4 {
        let h = bytes_mut::<IPV4_HDR_LEN>(ctx, ETH_LEN)?;
        let mut i = 0;
        while i < 4 {
            h.swap(12 + i, 16 + i);
            i += 1;
        }
        h[8] = REPLY_TTL;
        h[10] = 0;
        h[11] = 0;
        let sum = csum::finish(csum::sum_words(h));
        h[10..12].copy_from_slice(&sum.to_ne_bytes());
    } else {
        let h = bytes_mut::<IPV6_HDR_LEN>(ctx, ETH_LEN)?;
        h[7] = REPLY_TTL;
        let mut i = 0;
        while i < 16 {
            h.swap(8 + i, 24 + i);
            i += 1;
        }
    }
    let eth = bytes_mut::<12>(ctx, 0)?;
    let mut i = 0;
    while i < 6 {
        eth.swap(i, 6 + i);
        i += 1;
    }
    Some(())
}
