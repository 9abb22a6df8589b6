//! Stage 0, the backend's side of dsr (`decap`): an IP-in-IP or IPv6-in-IPv6 packet
//! addressed to this host loses its outer header, and the inner packet is what the
//! rest of the pipeline sees. Such a packet is for this host's `encapsulated`
//! services only, and anything else of it goes to the kernel (a VIP on its loopback).

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{Addr, StatIndex, FAMILY_V4, FAMILY_V6};

use crate::{
    encap, forward,
    maps::{CONFIG, SCRATCH},
    mem::{load, this_cpu},
    packet::{
        Verdict, ETH_LEN, ETH_P_IP, ETH_P_IPV6, IPPROTO_IPIP, IPPROTO_IPV6, IPV4_HDR_LEN,
        IPV6_HDR_LEN,
    },
};

const BPF_FIB_LKUP_RET_NOT_FWDED: i64 = 4;
const BPF_FIB_LKUP_RET_FWD_DISABLED: i64 = 5;

/// A decapsulated packet that is for none of this host's `encapsulated` services.
pub const NOT_FOR_US: Verdict = (xdp_action::XDP_PASS, StatIndex::PassDecapsulated);

/// Whether the packet came out of a tunnel to this host (its outer header is gone
/// then). Only with decapsulation configured; anything else is left as it is.
#[inline(always)]
pub fn run(ctx: &XdpContext) -> bool {
    CONFIG.get(0).is_some_and(|c| c.decap != 0) && decapsulate(ctx).is_some()
}

/// None: not a tunnel's packet to this host (it goes through the pipeline as any other).
#[inline(always)]
fn decapsulate(ctx: &XdpContext) -> Option<()> {
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
        (FAMILY_V6, IPV6_HDR_LEN, h[6], src, dst)
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
    encap::decapsulate(ctx, outer_len, inner_type)
}

/// Whether the packet is for this host, not passing through: the FIB delivers `dst`
/// locally (it would not forward it). On a host that does not forward at all (the
/// FIB says so before it looks at the route: a backend with default sysctls) every
/// packet that reaches it is for it, or dropped by the kernel anyway.
#[inline(always)]
fn is_local(ctx: &XdpContext, family: u8, src: &Addr, dst: &Addr) -> bool {
    let Some(scratch) = this_cpu(&SCRATCH, 0) else {
        return false;
    };
    let rc = forward::query(
        ctx,
        &mut scratch.fib,
        (family, 0),
        (src, dst),
        ctx.ingress_ifindex() as u32,
        0,
    );
    rc == BPF_FIB_LKUP_RET_NOT_FWDED || rc == BPF_FIB_LKUP_RET_FWD_DISABLED
}
