//! Redirect failures: the XDP program counts a frame as forwarded when bpf_redirect
//! accepts it, but the kernel sends it later (a bulk queue flushed at the end of the
//! NAPI poll) and can still drop it there. Two raw tracepoints see that outcome and
//! count it as `event_redirect_failed`, for the interfaces this agent attached to (by namespace and ifindex).
//!
//! Raw tracepoints take no tracefs, and their arguments are the TP_PROTO's.

use aya_ebpf::{macros::raw_tracepoint, programs::RawTracePointContext};
use lb_common::{watch_key, StatIndex};

use crate::{
    maps::{NETDEV_LAYOUT, REDIRECT_WATCH},
    mem::{copied, read_kernel},
    stats,
};

/// xdp_devmap_xmit(from_dev, to_dev, int sent, int drops, int err): one bulk send,
/// `drops` of its frames lost.
#[raw_tracepoint(tracepoint = "xdp_devmap_xmit")]
pub fn xlb_devmap_xmit(ctx: RawTracePointContext) -> i32 {
    let from_dev: u64 = ctx.arg(0);
    let drops: u64 = ctx.arg(3);
    let drops = drops as i32;
    if drops > 0 && watched(from_dev) {
        stats::count_n(StatIndex::EventRedirectFailed, drops as u64);
    }
    0
}

/// xdp_redirect_err(dev, xdp, tgt, int err, ...): bpf_redirect's target refused the
/// frame outright (native mode on a device without ndo_xdp_xmit, or generic mode's
/// xdp_do_generic_redirect failing).
#[raw_tracepoint(tracepoint = "xdp_redirect_err")]
pub fn xlb_redirect_err(ctx: RawTracePointContext) -> i32 {
    let dev: u64 = ctx.arg(0);
    if watched(dev) {
        stats::count_n(StatIndex::EventRedirectFailed, 1);
    }
    0
}

/// Whether `dev` (a struct net_device pointer) is one of this agent's interfaces: its
/// namespace and ifindex, read at offsets the agent took from the kernel's BTF.
#[inline(always)]
fn watched(dev: u64) -> bool {
    let Some(layout) = NETDEV_LAYOUT.get(0) else {
        return false;
    };
    if dev == 0 || layout.ifindex == 0 {
        return false;
    }
    let Some(ifindex) = read_kernel::<u32>(dev + layout.ifindex as u64) else {
        return false;
    };
    let Some(net) = read_kernel::<u64>(dev + layout.nd_net as u64) else {
        return false;
    };
    let Some(inum) = read_kernel::<u32>(net + layout.net_inum as u64) else {
        return false;
    };
    copied(&REDIRECT_WATCH, &watch_key(inum, ifindex)).is_some()
}
