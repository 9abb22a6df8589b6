//! xlb's XDP program. The pipeline reads top to bottom (see docs/design.md): decap →
//! parse → fragments → VIP filter → conntrack, or on a miss service lookup, source
//! ranges and Maglev → NAT rewrite (or dsr's encapsulation) → FIB forward, with the
//! reverse path for replies; what is not TCP or UDP goes to the L2 answers and the
//! ICMP stages (echo, errors) instead. Each stage is a module; this file only wires
//! them, in order, across the BPF functions the stack limit asks for; balance.rs
//! wires the forward and reverse paths of a balanced packet.
// On the host (cargo clippy/build --workspace) this compiles as an empty binary, so
// the code is still type-checked and linted; the real build is for target_arch = "bpf".
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// The flow table's compare-and-swap (mem::cas): core's atomics have none on BPF.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

// Below the stages: what they share, and every `unsafe` (mem.rs).
mod csum;
mod encap;
mod flows;
mod maps;
mod mem;
mod packet;
// The stages (the functions below and balance.rs call them in pipeline order).
mod allow;
mod balance;
mod conntrack;
mod decap;
mod echo;
mod flood;
mod forward;
mod fragments;
mod icmp;
mod l2;
mod lookup;
mod maglev;
mod nat;
mod parse;
mod stats;
mod trace;
mod tunnel;
// The other programs: TC egress, redirect-failure tracepoints, benchmark helpers.
mod bench;
mod egress;
mod redirect;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use lb_common::StatIndex;

use crate::{
    balance::NEW_FLOW_ACTION,
    packet::{Packet, Verdict, ETH_P_IP, ETH_P_IPV6},
    parse::Other,
};

// The entry: the common packet's way, or the pipeline; then the debug log. Calls side
// by side, not nested: the log's subprogram needs a frame of its own (80 bytes), which
// the pipeline's would leave no room for under the 512-byte limit on a chain of calls.
#[xdp]
pub fn xlb(ctx: XdpContext) -> u32 {
    // The common packet first, on its own way; the debug log follows every packet
    // through the pipeline, which notes its flow.
    let mut out = if trace::enabled() {
        PIPELINE
    } else {
        common_packet(ctx.ctx)
    };
    if out == PIPELINE {
        out = pipeline(ctx.ctx);
    }
    // What is not TCP or UDP, and a new flow, go on in calls of their own, side by
    // side for the same reason: the frames of a chain of calls share 512 bytes, and
    // the pipeline's takes most.
    if out == OTHER {
        out = other_stages(ctx.ctx);
    } else if out == NEW_FLOW {
        out = balance_new_flow();
        if out == NEW_FLOW {
            out = send_new_flow(ctx.ctx);
        }
    }
    let (action, reason) = (out as u32, (out >> 32) as u32);
    trace::packet_raw(action, reason);
    action
}

/// The fast path: an established flow's packet, a reply, the host's own traffic, or a
/// new flow's first packet up to its own calls (NEW_FLOW), when it is a whole TCP or
/// UDP packet (parse::common_v4, common_v6); PIPELINE for anything else. A BPF
/// function of its own per family: the pipeline's, which handles every packet, keeps
/// most of its values on the stack, and these spill less; one function for both
/// families spilled more than two (measured: docs/datapath.md, "The common packet has
/// its own way").
#[inline(always)]
fn common_packet(raw: *mut aya_ebpf::bindings::xdp_md) -> u64 {
    let ctx = &XdpContext { ctx: raw };
    match parse::ether_type(ctx) {
        Some(ETH_P_IP) => common_v4(raw),
        Some(ETH_P_IPV6) => common_v6(raw),
        _ => PIPELINE,
    }
}

#[inline(never)]
fn common_v4(raw: *mut aya_ebpf::bindings::xdp_md) -> u64 {
    let ctx = &XdpContext { ctx: raw };
    let len = (ctx.data_end() - ctx.data()) as u64;
    common_finish(balance::common(ctx, len, parse::common_v4(ctx)), len)
}

#[inline(never)]
fn common_v6(raw: *mut aya_ebpf::bindings::xdp_md) -> u64 {
    let ctx = &XdpContext { ctx: raw };
    let len = (ctx.data_end() - ctx.data()) as u64;
    common_finish(balance::common(ctx, len, parse::common_v6(ctx)), len)
}

/// The fast path's packet counted as the pipeline counts it (its `seen_*`, its reason;
/// a new flow's `seen_*` alone, and NEW_FLOW, as the pipeline returns it); PIPELINE,
/// uncounted, for one it left untouched.
#[inline(always)]
fn common_finish(common: Option<(StatIndex, Verdict)>, len: u64) -> u64 {
    match common {
        Some((seen, verdict)) => {
            stats::count(seen, len);
            if verdict.0 == NEW_FLOW_ACTION {
                return NEW_FLOW;
            }
            finish(verdict, len)
        }
        None => PIPELINE,
    }
}

// A BPF subprogram of its own, taking the context pointer itself (a pointer to the
// entry's stack is what the verifier refused here). Returns the action in the low 32
// bits, the reason's index in the high 32: a subprogram returns one register.
#[inline(never)]
fn pipeline(raw: *mut aya_ebpf::bindings::xdp_md) -> u64 {
    let ctx = &XdpContext { ctx: raw };
    let decapsulated = decap::run(ctx);
    let len = (ctx.data_end() - ctx.data()) as u64;
    let (seen, parsed) = parse::parse(ctx);
    stats::count(seen, len);
    let verdict = stages(ctx, parsed, len, decapsulated);
    match verdict.0 {
        NEW_FLOW_ACTION => NEW_FLOW,
        OTHER_ACTION => OTHER,
        _ => finish(verdict, len),
    }
}

/// What is not TCP or UDP (pipeline's OTHER), as the parser left it in scratch
/// memory: the pipeline's frame has no room for these stages' stack.
#[inline(never)]
fn other_stages(raw: *mut aya_ebpf::bindings::xdp_md) -> u64 {
    let ctx = &XdpContext { ctx: raw };
    let len = (ctx.data_end() - ctx.data()) as u64;
    let Some(scratch) = mem::this_cpu(&maps::SCRATCH, 0) else {
        return finish((xdp_action::XDP_PASS, StatIndex::PassParseError), len);
    };
    let other = match scratch.other.pass {
        Some(reason) => Other::Pass(reason),
        None => Other::Icmp(scratch.other.pkt),
    };
    finish(not_balanced(ctx, &other), len)
}

/// Counts the packet's reason; the verdict as a subprogram returns it. The host's own
/// traffic (PassNotVip) is not counted: userspace derives it (StatIndex::is_derived).
#[inline(always)]
fn finish((action, reason): Verdict, len: u64) -> u64 {
    if !reason.is_derived() {
        stats::count(reason, len);
    }
    action as u64 | (reason as u64) << 32
}

/// What the fast path or the pipeline returns for a new flow it left in scratch memory
/// (maps::NewFlow) to balance (balance::NEW_FLOW_ACTION).
const NEW_FLOW: u64 = u64::MAX;
/// What the fast path returns for a packet the pipeline is to handle: no verdict is
/// this (a reason's index is far below u32::MAX).
const PIPELINE: u64 = u64::MAX - 1;
/// What the pipeline returns for a packet that is not TCP or UDP (other_stages).
const OTHER_ACTION: u32 = u32::MAX - 1;
const OTHER: u64 = (u32::MAX - 1) as u64;

/// What follows the parser. `decapsulated`: the packet came out of a tunnel to this
/// host (decap.rs), and is for this host's `encapsulated` services or the kernel.
#[inline(always)]
fn stages(
    ctx: &XdpContext,
    parsed: Result<Packet, Other>,
    len: u64,
    decapsulated: bool,
) -> Verdict {
    let mut pkt = match parsed {
        Ok(pkt) => pkt,
        Err(_) if decapsulated => return decap::NOT_FOR_US,
        Err(other) => {
            if let Some(scratch) = mem::this_cpu(&maps::SCRATCH, 0) {
                scratch.other = match other {
                    Other::Icmp(pkt) => maps::OtherPacket { pkt, pass: None },
                    Other::Pass(reason) => maps::OtherPacket {
                        pkt: scratch.other.pkt,
                        pass: Some(reason),
                    },
                };
                return (OTHER_ACTION, StatIndex::PassNotIp);
            }
            return (xdp_action::XDP_PASS, StatIndex::PassParseError);
        }
    };
    // A later fragment takes its first's ports first (one Packet for both kinds: the
    // stack has no room for a second).
    let followed = fragments::follow(&mut pkt);
    trace::note(Some(&pkt.key));
    match followed {
        Ok(()) => balance::balance(ctx, &pkt, len, decapsulated),
        Err(verdict) => verdict,
    }
}

/// What is not TCP or UDP: the L2 answers, then ICMP's stages (echo, errors about our
/// flows); the rest passes. Off the balanced packets' way: they pay nothing for it.
#[inline(always)]
fn not_balanced(ctx: &XdpContext, other: &Other) -> Verdict {
    trace::note(other.key());
    if let Some(verdict) = l2::answer(ctx, other) {
        return verdict;
    }
    match other {
        Other::Icmp(pkt) => match echo::answer(ctx, pkt) {
            Some(verdict) => verdict,
            None => icmp::error(ctx, pkt),
        },
        Other::Pass(reason) => (xdp_action::XDP_PASS, *reason),
    }
}

/// dnat replies leaving this host from a local backend (see egress.rs).
#[classifier]
pub fn xlb_egress(ctx: TcContext) -> i32 {
    egress::reply(&ctx)
}

/// The baseline for benchmarks: does nothing but pass. Never attached by the agent.
#[xdp]
pub fn xlb_baseline_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// A new flow: its backend by Maglev, its source (and nat's SNAT port), and its
/// entries (unless the flood guard is on or the service is stateless), from what the
/// fast path or the pipeline left in scratch memory; NEW_FLOW when it is to be sent.
/// Its own BPF function, called from the entry: see there.
#[inline(never)]
fn balance_new_flow() -> u64 {
    let (Some(scratch), Some(cfg)) = (mem::this_cpu(&maps::SCRATCH, 0), maps::CONFIG.get(0)) else {
        return NEW_FLOW;
    };
    let maps::Scratch { new, rev, ct, .. } = scratch;
    match balance::decide_new_flow(new, cfg, (rev, ct)) {
        Ok(()) => NEW_FLOW,
        Err(verdict) => finish(verdict, new.len),
    }
}

/// A balanced new flow's first packet. Its own BPF function, called from the entry:
/// see there.
#[inline(never)]
fn send_new_flow(raw: *mut aya_ebpf::bindings::xdp_md) -> u64 {
    let ctx = &XdpContext { ctx: raw };
    let Some(scratch) = mem::this_cpu(&maps::SCRATCH, 0) else {
        return NEW_FLOW;
    };
    let maps::Scratch { new, ct, .. } = scratch;
    finish(balance::send_new_flow(ctx, new, ct), new.len)
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
