//! Stage 4 for `dsr`: the client's packet, unchanged, inside an outer IP header to the
//! backend (IP-in-IP for IPv4, IPv6-in-IPv6 for IPv6; encap.rs writes it), then sent;
//! or, when the encapsulated packet would not fit the path, an ICMP "too big" back to
//! the client.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{Addr, NextHop, StatIndex, FAMILY_V4};

use crate::{
    csum,
    encap::{self, ipv4_addresses, ipv4_header, ipv6_header, resize_head},
    forward,
    maps::BACKEND_TUNNELS,
    mem::{bytes_mut, load, store, truncate},
    packet::{
        Packet, Verdict, ETH_LEN, FRAG_NONE, IPPROTO_ICMP, IPPROTO_ICMPV6, IPV4_HDR_LEN,
        IPV6_HDR_LEN,
    },
    stats,
};

const ICMP_HDR_LEN: usize = 8;
/// An ICMP error quotes the IPv4 header (no options) and 8 bytes of its payload, and
/// for IPv6 the fixed header and 8 bytes; enough for the sender to find its socket.
const QUOTE_V4: usize = IPV4_HDR_LEN + 8;
const QUOTE_V6: usize = IPV6_HDR_LEN + 8;

/// Where a dsr backend's packets go: its tunnel endpoint when it has one, else the
/// backend itself.
#[inline(always)]
pub fn outer_destination(backend_id: u32, backend_addr: &Addr) -> Addr {
    let tunnel = BACKEND_TUNNELS.get(backend_id).copied().unwrap_or_default();
    if tunnel != [0; 4] {
        tunnel
    } else {
        *backend_addr
    }
}

/// The packet, unchanged, inside an outer header from `outer.0` (this host) to the
/// backend `outer.1`. The next hop is found first, for the encapsulated length: a
/// packet that would no longer fit is answered with ICMP too-big instead.
#[inline(always)]
pub fn send(
    ctx: &XdpContext,
    pkt: &Packet,
    (outer_src, outer_dst): (&Addr, &Addr),
    backend_id: u32,
    (len, now): (u64, u64),
    flow_hop: Option<&mut NextHop>,
) -> Verdict {
    let k = &pkt.key;
    let new_flow = flow_hop.is_none();
    let overhead = encap::overhead(k.family);
    let route = forward::Route {
        family: k.family,
        proto: encap::outer_proto(k.family),
        src: outer_src,
        dst: outer_dst,
        tot_len: pkt.ip_len.saturating_add(overhead),
        own_source: true,
    };
    let hop = match forward::resolve(ctx, &route, now, flow_hop) {
        Ok(hop) => hop,
        // A fragment carries no DF: nothing asked for an ICMP answer (IPv6 always does).
        Err((_, StatIndex::DropTooBig)) if pkt.frag != FRAG_NONE && k.family == FAMILY_V4 => {
            return (xdp_action::XDP_DROP, StatIndex::DropFragmentTooBig);
        }
        Err((_, StatIndex::DropTooBig)) => {
            let mtu = forward::mtu_of_last_lookup().saturating_sub(overhead);
            return match too_big(ctx, pkt, mtu) {
                Some(()) => (xdp_action::XDP_TX, StatIndex::IcmpTooBigSent),
                None => (xdp_action::XDP_DROP, StatIndex::DropTooBig),
            };
        }
        Err(verdict) => return verdict,
    };
    if encap::encapsulate(ctx, pkt, outer_src, outer_dst).is_none() {
        return (xdp_action::XDP_DROP, StatIndex::DropEncapFailed);
    }
    stats::count_flow(backend_id, len, new_flow);
    forward::send(ctx, &hop, StatIndex::FwdForward)
}

/// Turns the client's packet into ICMP fragmentation-needed (IPv4) or packet-too-big
/// (IPv6) from the VIP back to the client, announcing `mtu` (what is left for the
/// client's packet once encapsulated), and sends it back out where it came from. The
/// error quotes the start of the packet, which is already in place after the new
/// headers. None (the caller drops) for IPv4 with options.
#[inline(always)]
fn too_big(ctx: &XdpContext, pkt: &Packet, mtu: u16) -> Option<()> {
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
        truncate(ctx, ETH_LEN + HDRS + QUOTE_V4)?;
        store(ctx, 0, macs)?;
        let icmp = bytes_mut::<{ ICMP_HDR_LEN + QUOTE_V4 }>(ctx, ETH_LEN + IPV4_HDR_LEN)?;
        let m = mtu.to_be_bytes();
        icmp[..8].copy_from_slice(&[3, 4, 0, 0, 0, 0, m[0], m[1]]);
        let check = csum::finish(csum::sum_bytes(icmp));
        icmp[2..4].copy_from_slice(&check.to_ne_bytes());
        let h = bytes_mut::<IPV4_HDR_LEN>(ctx, ETH_LEN)?;
        ipv4_header(h, (HDRS + QUOTE_V4) as u16, false, IPPROTO_ICMP);
        ipv4_addresses(h, k.dst[0], k.src[0]);
    } else {
        const HDRS: usize = IPV6_HDR_LEN + ICMP_HDR_LEN;
        resize_head(ctx, -(HDRS as i32))?;
        truncate(ctx, ETH_LEN + HDRS + QUOTE_V6)?;
        store(ctx, 0, macs)?;
        let payload = (ICMP_HDR_LEN + QUOTE_V6) as u16;
        let h = bytes_mut::<IPV6_HDR_LEN>(ctx, ETH_LEN)?;
        ipv6_header(h, 0, payload, IPPROTO_ICMPV6, (&k.dst, &k.src));
        // The pseudo-header: the addresses from the header just written (summed from
        // the frame: kept from the key, they would take stack), length, next header.
        let addrs = bytes_mut::<32>(ctx, ETH_LEN + 8)?;
        let pseudo = csum::sum_bytes(addrs) + csum::sum_pseudo_tail(payload, IPPROTO_ICMPV6);
        let icmp = bytes_mut::<{ ICMP_HDR_LEN + QUOTE_V6 }>(ctx, ETH_LEN + IPV6_HDR_LEN)?;
        let m = (mtu as u32).to_be_bytes();
        icmp[..8].copy_from_slice(&[2, 0, 0, 0, m[0], m[1], m[2], m[3]]);
        let check = csum::finish(csum::sum_bytes(icmp) + pseudo);
        icmp[2..4].copy_from_slice(&check.to_ne_bytes());
    }
    Some(())
}
