//! xlb's XDP program. The pipeline reads top to bottom (see docs/design.md): decap →
//! parse → fragments → VIP filter → conntrack, or on a miss service lookup, source
//! ranges and Maglev → NAT rewrite (or dsr's encapsulation) → FIB forward, with the
//! reverse path for replies; what is not TCP or UDP goes to the L2 answers and the
//! ICMP stages (echo, errors) instead. Each stage is a module; this file only wires
//! them, in order.
// On the host (cargo clippy/build --workspace) this compiles as an empty binary, so
// the code is still type-checked and linted; the real build is for target_arch = "bpf".
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

// Below the stages: what they share, and every `unsafe` (mem.rs).
mod csum;
mod encap;
mod maps;
mod mem;
mod packet;
// The stages (the functions below call them in pipeline order).
mod allow;
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
use lb_common::{
    Backend, ConnValue, DatapathConfig, NextHop, ReverseNat, ServiceValue, StatIndex,
    BACKEND_F_SVC_SOURCE_RANGES, MODE_DSR, SVC_F_SOURCE_RANGES,
};

use crate::{
    nat::Rewrite,
    packet::{Packet, Verdict},
    parse::Other,
};

const TTL_EXCEEDED: Verdict = (xdp_action::XDP_PASS, StatIndex::PassTtlExceeded);

// The entry: the pipeline, then the debug log. Two calls side by side, not nested: the
// log's subprogram needs a frame of its own (80 bytes), which the pipeline's would
// leave no room for under the 512-byte limit on a chain of calls.
#[xdp]
pub fn xlb(ctx: XdpContext) -> u32 {
    let out = pipeline(ctx.ctx);
    let (action, reason) = (out as u32, (out >> 32) as u32);
    trace::packet_raw(action, reason);
    action
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
    let (action, reason) = stages(ctx, parsed, len, decapsulated);
    stats::count(reason, len);
    action as u64 | (reason as u64) << 32
}

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
        Err(other) => return not_balanced(ctx, &other),
    };
    // A later fragment takes its first's ports first (one Packet for both kinds: the
    // stack has no room for a second).
    let followed = fragments::follow(&mut pkt);
    trace::note(Some(&pkt.key));
    match followed {
        Ok(()) => balance(ctx, &pkt, len, decapsulated),
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

/// A client's packet to a service (forward path) or a backend's reply to a NAT flow
/// (reverse path); anything else passes. A decapsulated packet's service is looked
/// up first (only `encapsulated` services apply to it), and none means it is not for
/// us. One call of the forward path for both kinds of packet, so that it is inlined
/// once.
#[inline(always)]
fn balance(ctx: &XdpContext, pkt: &Packet, len: u64, decapsulated: bool) -> Verdict {
    // A reference into the map, not a copy: the stack is the scarce resource.
    let Some(cfg) = maps::CONFIG.get(0) else {
        return lookup::NOT_A_VIP;
    };
    let decap_svc = if decapsulated {
        match lookup::service(&pkt.key, true) {
            Some(svc) => Some(svc),
            None => return decap::NOT_FOR_US,
        }
    } else {
        None
    };
    if decapsulated || lookup::may_be_service(&pkt.key, cfg) {
        if let Some(verdict) = forward_path(ctx, pkt, decap_svc.as_ref(), cfg, len) {
            return verdict;
        }
    }
    if decapsulated {
        return decap::NOT_FOR_US;
    }
    if lookup::may_be_reply(&pkt.key, cfg) {
        if let Some(rev) = lookup::reverse(&pkt.key) {
            return reverse_path(ctx, pkt, rev, len);
        }
    }
    lookup::NOT_A_VIP
}

/// Client → VIP: keep the flow's backend, or pick one for a new flow; then send.
/// None: the packet is for no service. The flow's conntrack entry is looked up before
/// the service: an established flow's backend carries its service's id and mode, so
/// its packets need one hashed lookup, not two. `svc`: the service, when the caller
/// has had to look it up already (decapsulated packets).
#[inline(always)]
fn forward_path(
    ctx: &XdpContext,
    pkt: &Packet,
    svc: Option<&ServiceValue>,
    cfg: &DatapathConfig,
    len: u64,
) -> Option<Verdict> {
    let key = &pkt.key;
    let now = mem::now();
    let (ct, backend, service_id, new) = match conntrack::lookup(key, pkt.tcp_flags, now, cfg) {
        Some((ct, backend)) => {
            // The ranges may have changed since the flow began: it is cut.
            let restricted = backend.flags & BACKEND_F_SVC_SOURCE_RANGES != 0;
            if let Err(verdict) = allow::check(restricted, backend.service_id, key.family, &key.src)
            {
                conntrack::cut(key, ct, backend);
                return Some(verdict);
            }
            (ct, backend, backend.service_id, false)
        }
        None => {
            let svc = match svc {
                Some(svc) => *svc,
                None => lookup::service(key, false)?,
            };
            let restricted = svc.flags & SVC_F_SOURCE_RANGES != 0;
            if let Err(verdict) = allow::check(restricted, svc.id, key.family, &key.src) {
                return Some(verdict);
            }
            match new_flow(pkt, &svc, cfg, len, now) {
                Ok((ct, backend)) => (ct, backend, svc.id, true),
                Err(verdict) => return Some(verdict),
            }
        }
    };
    fragments::record(pkt, now);
    // Untouched, so the kernel answers with ICMP time exceeded from the right address.
    if pkt.ttl <= 1 {
        return Some(TTL_EXCEEDED);
    }
    Some(send_to_backend(
        ctx,
        pkt,
        (ct, new),
        backend,
        service_id,
        (len, now),
    ))
}

/// A new flow: its backend by Maglev, its source (and nat's SNAT port), and its
/// entries (unless the flood guard is on). The returned entry is the scratch copy of
/// what went into the map.
#[inline(always)]
fn new_flow<'run>(
    pkt: &Packet,
    svc: &ServiceValue,
    cfg: &DatapathConfig,
    len: u64,
    now: u64,
) -> Result<(&'run mut ConnValue, &'static Backend), Verdict> {
    // No entry for a packet that will not be forwarded (see forward_path).
    if pkt.ttl <= 1 {
        return Err(TTL_EXCEEDED);
    }
    let key = &pkt.key;
    let Some((backend_id, backend)) = maglev::pick(svc, key) else {
        return Err((xdp_action::XDP_DROP, StatIndex::DropNoBackend));
    };
    let mode = backend.mode();
    let snat = nat::source(backend, mode)?;
    let flooded = flood::check(now, cfg, mode)?;
    // Never missing: a per-CPU array of one.
    let Some(scratch) = mem::this_cpu(&maps::SCRATCH, 0) else {
        return Err((xdp_action::XDP_DROP, StatIndex::DropPortAlloc));
    };
    nat::reply_entry(&mut scratch.rev, key, (svc.id, backend_id), now);
    let source = nat::claim(key, (backend, mode), snat, cfg, &scratch.rev)?;
    let ct = conntrack::create(
        &mut scratch.ct,
        pkt,
        backend_id,
        source,
        (now, flooded),
        len,
    );
    Ok((ct, backend))
}

/// DNAT + SNAT (nat, dnat) or encapsulation (dsr), then the route to the backend.
/// A new flow's `ct` is the scratch copy of its entry: only an entry found in the map
/// keeps the next hop it is given.
#[inline(always)]
fn send_to_backend(
    ctx: &XdpContext,
    pkt: &Packet,
    (ct, new_flow): (&mut ConnValue, bool),
    backend: &Backend,
    service_id: u32,
    (len, now): (u64, u64),
) -> Verdict {
    let ids = (service_id, ct.backend_id);
    let flow_hop = (!new_flow).then_some(&mut ct.hop);
    if backend.mode() == MODE_DSR {
        let outer_dst = tunnel::outer_destination(ct.backend_id, &backend.addr);
        let outer = (&ct.nat_addr, &outer_dst);
        return tunnel::send(ctx, pkt, outer, ids, (len, now), flow_hop);
    }
    let to = Rewrite::to_backend((ct.nat_addr, ct.nat_port), backend);
    translate_and_send(
        ctx,
        pkt,
        &to,
        ids,
        (len, now),
        flow_hop,
        StatIndex::FwdForward,
    )
}

/// Backend → SNAT address (or → client, dnat): translate back to VIP → client and send.
#[inline(always)]
fn reverse_path(ctx: &XdpContext, pkt: &Packet, rev: &mut ReverseNat, len: u64) -> Verdict {
    if pkt.ttl <= 1 {
        return TTL_EXCEEDED;
    }
    let now = mem::now();
    rev.last_seen_ns = now;
    fragments::record(pkt, now);
    let to = Rewrite::to_client(rev);
    conntrack::mark_reply(pkt, rev);
    let ids = (rev.service_id, rev.backend_id);
    let flow_hop = Some(&mut rev.hop);
    translate_and_send(
        ctx,
        pkt,
        &to,
        ids,
        (len, now),
        flow_hop,
        StatIndex::FwdReverse,
    )
}

/// The common tail of both directions: rewrite, count, route and send. `flow_hop` is
/// the flow entry's cached next hop; only a new flow (forward path) has none yet.
#[inline(always)]
fn translate_and_send(
    ctx: &XdpContext,
    pkt: &Packet,
    to: &Rewrite,
    (service_id, backend_id): (u32, u32),
    (len, now): (u64, u64),
    flow_hop: Option<&mut NextHop>,
    sent: StatIndex,
) -> Verdict {
    let new_flow = flow_hop.is_none();
    // nat's forward path has the SNAT address as source, one of this host's own.
    let own_source = sent == StatIndex::FwdForward && to.src != pkt.key.src;
    if nat::rewrite(ctx, pkt, to).is_none() {
        return (xdp_action::XDP_PASS, StatIndex::PassParseError);
    }
    stats::count_flow(service_id, backend_id, len, new_flow);
    let k = &pkt.key;
    let route = forward::Route {
        family: k.family,
        proto: k.proto,
        src: &to.src,
        dst: &to.dst,
        tot_len: pkt.ip_len,
        own_source,
    };
    forward::forward(ctx, &route, now, flow_hop, sent)
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
