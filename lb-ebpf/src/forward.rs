//! Stage 5: route the rewritten packet with bpf_fib_lookup and send it out: XDP_TX on
//! the interface it came in on (one-arm), bpf_redirect to another (two-arm), or
//! XDP_PASS when the neighbour is not resolved yet, so the kernel resolves it and
//! forwards this packet itself (needs ip_forward).
//!
//! The FIB's answer is cached per destination for NEXTHOP_TTL_NS: the lookup was a
//! third of an established flow's cost (docs/datapath.md). Route and neighbour changes
//! therefore apply within that time; a packet longer than any the FIB accepted for the
//! hop goes to the FIB again, so its MTU check is never skipped.

use aya_ebpf::{
    bindings::{bpf_fib_lookup, xdp_action},
    helpers::{bpf_fib_lookup as fib_lookup, bpf_ktime_get_coarse_ns, bpf_redirect},
    programs::XdpContext,
};
use lb_common::{Addr, StatIndex, FAMILY_V4};
use network_types::eth::EthHdr;

use crate::{
    maps::{NextHop, NextHopKey, NEXTHOP},
    mem::{load, store},
};

const NEXTHOP_TTL_NS: u64 = 1_000_000_000;

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;

/// The verdict, and the counter that explains it (`sent` when the packet left).
#[inline(always)]
pub fn forward(
    ctx: &XdpContext,
    family: u8,
    proto: u8,
    src: &Addr,
    dst: &Addr,
    tot_len: u16,
    sent: StatIndex,
) -> (u32, StatIndex) {
    let ingress = ctx.ingress_ifindex() as u32;
    let key = NextHopKey {
        dst: *dst,
        ingress,
        family,
        _pad: [0; 3],
    };
    // SAFETY: a plain helper call.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let hop = match NEXTHOP.get_ptr(key) {
        // SAFETY: a valid map value pointer for this run; copied out at once.
        Some(h) if unsafe { (*h).expires_ns > now && tot_len <= (*h).max_len } => unsafe { *h },
        _ => match fib(ctx, family, proto, src, dst, tot_len, ingress) {
            Ok(hop) => {
                let hop = NextHop {
                    expires_ns: now + NEXTHOP_TTL_NS,
                    ..hop
                };
                let _ = NEXTHOP.insert(key, hop, 0);
                hop
            }
            Err(verdict) => return verdict,
        },
    };
    let Some(mut eth) = load::<EthHdr>(ctx, 0) else {
        return (xdp_action::XDP_DROP, StatIndex::PassParseError);
    };
    eth.dst_addr = hop.dmac;
    eth.src_addr = hop.smac;
    if store(ctx, 0, eth).is_none() {
        return (xdp_action::XDP_DROP, StatIndex::PassParseError);
    }
    if hop.ifindex == ingress {
        (xdp_action::XDP_TX, sent)
    } else {
        // SAFETY: a plain helper call.
        (unsafe { bpf_redirect(hop.ifindex, 0) } as u32, sent)
    }
}

/// Asks the FIB: the next hop, or the verdict when there is none to use.
#[inline(always)]
fn fib(
    ctx: &XdpContext,
    family: u8,
    proto: u8,
    src: &Addr,
    dst: &Addr,
    tot_len: u16,
    ingress: u32,
) -> Result<NextHop, (u32, StatIndex)> {
    // SAFETY: bpf_fib_lookup is plain old data; all-zero is a valid start.
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.l4_protocol = proto;
    p.ifindex = ingress;
    p.__bindgen_anon_1.tot_len = tot_len;
    if family == FAMILY_V4 {
        p.family = AF_INET;
        p.__bindgen_anon_3.ipv4_src = src[0];
        p.__bindgen_anon_4.ipv4_dst = dst[0];
    } else {
        p.family = AF_INET6;
        p.__bindgen_anon_3.ipv6_src = *src;
        p.__bindgen_anon_4.ipv6_dst = *dst;
    }
    // SAFETY: ctx.ctx is the program's own context, p a valid struct of the given size.
    let rc = unsafe {
        fib_lookup(
            ctx.ctx as *mut _,
            &mut p,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => Ok(NextHop {
            expires_ns: 0,
            ifindex: p.ifindex,
            max_len: tot_len,
            smac: p.smac,
            dmac: p.dmac,
        }),
        BPF_FIB_LKUP_RET_NO_NEIGH => Err((xdp_action::XDP_PASS, StatIndex::PassNeighbourUnknown)),
        _ => Err((xdp_action::XDP_DROP, StatIndex::DropFibFailure)),
    }
}
