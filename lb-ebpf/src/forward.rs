//! Stage 5: route the rewritten packet with bpf_fib_lookup and send it out: XDP_TX on
//! the interface it came in on (one-arm), bpf_redirect to another (two-arm), or
//! XDP_PASS when the neighbour is not resolved yet, so the kernel resolves it and
//! forwards this packet itself (needs ip_forward).

use aya_ebpf::{
    bindings::{bpf_fib_lookup, xdp_action},
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect},
    programs::XdpContext,
};
use lb_common::{Addr, StatIndex, FAMILY_V4};
use network_types::eth::EthHdr;

use crate::mem::{load, store};

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
    // SAFETY: bpf_fib_lookup is plain old data; all-zero is a valid start.
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.l4_protocol = proto;
    p.ifindex = ctx.ingress_ifindex() as u32;
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
        BPF_FIB_LKUP_RET_SUCCESS => {}
        BPF_FIB_LKUP_RET_NO_NEIGH => {
            return (xdp_action::XDP_PASS, StatIndex::PassNeighbourUnknown)
        }
        _ => return (xdp_action::XDP_DROP, StatIndex::DropFibFailure),
    }
    let Some(mut eth) = load::<EthHdr>(ctx, 0) else {
        return (xdp_action::XDP_DROP, StatIndex::PassParseError);
    };
    eth.dst_addr = p.dmac;
    eth.src_addr = p.smac;
    if store(ctx, 0, eth).is_none() {
        return (xdp_action::XDP_DROP, StatIndex::PassParseError);
    }
    if p.ifindex == ctx.ingress_ifindex() as u32 {
        (xdp_action::XDP_TX, sent)
    } else {
        // SAFETY: a plain helper call.
        (unsafe { bpf_redirect(p.ifindex, 0) } as u32, sent)
    }
}
