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
    flow_hash, Backend, ConnValue, DatapathConfig, NextHop, ReverseNat, ServiceValue, StatIndex,
    BACKEND_F_SVC_SOURCE_RANGES, MODE_DSR, MODE_NAT, SVC_F_SOURCE_RANGES, SVC_F_STATELESS,
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
    let mut out = pipeline(ctx.ctx);
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

/// Counts the packet's reason; the verdict as a subprogram returns it.
#[inline(always)]
fn finish((action, reason): Verdict, len: u64) -> u64 {
    stats::count(reason, len);
    action as u64 | (reason as u64) << 32
}

/// What the pipeline returns for a new flow it left in scratch memory (maps::NewFlow)
/// to balance: no XDP action is this.
const NEW_FLOW_ACTION: u32 = u32::MAX;
const NEW_FLOW: u64 = u64::MAX;
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
        if let Some(rev) = lookup::reverse(&pkt.key, cfg) {
            return reverse_path(ctx, pkt, rev, cfg, len);
        }
    }
    lookup::NOT_A_VIP
}

/// Client → VIP: keep the flow's backend and send, or leave a new flow to the entry's
/// next calls (NEW_FLOW_ACTION). None: the packet is for no service. The flow's conntrack entry is looked up before
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
    // The flow's hash: its conntrack bucket, and its Maglev slot if it is new.
    let hash = flow_hash(key, false);
    // The service first when it may be stateless: its packets have no conntrack entry
    // to find, and the lookup's miss would cost every one of them a cold bucket.
    let early = match svc {
        Some(svc) => Some(*svc),
        None if lookup::may_be_stateless(key) => lookup::service(key, false),
        None => None,
    };
    let stateless = early.is_some_and(|s| s.flags & SVC_F_STATELESS != 0);
    let found = if stateless {
        None
    } else {
        conntrack::lookup(key, hash, pkt.tcp_flags, now, cfg)
    };
    let (ct, backend) = match found {
        Some((ct, backend)) => {
            // The ranges may have changed since the flow began: it is cut.
            let restricted = backend.flags & BACKEND_F_SVC_SOURCE_RANGES != 0;
            if let Err(verdict) = allow::check(restricted, backend.service_id, key.family, &key.src)
            {
                conntrack::cut(key, hash, ct, backend, cfg);
                return Some(verdict);
            }
            (ct, backend)
        }
        None => {
            let svc = match early {
                Some(svc) => svc,
                None => lookup::service(key, false)?,
            };
            let restricted = svc.flags & SVC_F_SOURCE_RANGES != 0;
            if let Err(verdict) = allow::check(restricted, svc.id, key.family, &key.src) {
                return Some(verdict);
            }
            // Balanced and sent from the entry (see there), from scratch memory.
            let scratch = mem::this_cpu(&maps::SCRATCH, 0)?;
            scratch.new = maps::NewFlow {
                pkt: *pkt,
                svc,
                hash,
                len,
                now,
            };
            return Some((NEW_FLOW_ACTION, StatIndex::FwdForward));
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
        (ct, false),
        backend,
        backend.service_id,
        (len, now),
    ))
}

/// A new flow: its backend by Maglev, its source (and nat's SNAT port), and its
/// entries (unless the flood guard is on or the service is stateless), from what the
/// pipeline left in scratch memory; NEW_FLOW when it is to be sent. Its own BPF
/// function, called from the entry: see there.
#[inline(never)]
fn balance_new_flow() -> u64 {
    let (Some(scratch), Some(cfg)) = (mem::this_cpu(&maps::SCRATCH, 0), maps::CONFIG.get(0)) else {
        return NEW_FLOW;
    };
    let maps::Scratch { new, rev, ct, .. } = scratch;
    match decide_new_flow(new, cfg, (rev, ct)) {
        Ok(()) => NEW_FLOW,
        Err(verdict) => finish(verdict, new.len),
    }
}

#[inline(always)]
fn decide_new_flow(
    new: &maps::NewFlow,
    cfg: &DatapathConfig,
    (rev, ct): (&mut ReverseNat, &mut ConnValue),
) -> Result<(), Verdict> {
    let (pkt, hash, svc, now) = (&new.pkt, new.hash, &new.svc, new.now);
    // No entry for a packet that will not be forwarded (see forward_path).
    if pkt.ttl <= 1 {
        return Err(TTL_EXCEEDED);
    }
    let key = &pkt.key;
    let Some((backend_id, backend)) = maglev::pick(svc, key, hash) else {
        return Err((xdp_action::XDP_DROP, StatIndex::DropNoBackend));
    };
    let mode = backend.mode();
    let snat = nat::source(backend, mode)?;
    // A stateless service (dsr, dnat) has no flows to protect: every packet is new,
    // and the flood guard does not count them. nat cannot be (its replies need the
    // entry); the agent never sets the flag on it.
    let stateless = svc.flags & SVC_F_STATELESS != 0 && mode != MODE_NAT;
    let flooded = !stateless && flood::check(now, cfg, mode)?;
    if mode != MODE_DSR {
        nat::reply_entry(rev, key, (svc.id, backend_id), now);
    }
    let source = nat::claim(key, (backend, mode), snat, cfg, rev)?;
    let keep = conntrack::Keep { flooded, stateless };
    conntrack::create(
        ct,
        (pkt, hash),
        backend_id,
        source,
        (now, keep, cfg),
        new.len,
    );
    Ok(())
}

/// A balanced new flow's first packet, sent as forward_path sends an established
/// flow's. Its own BPF function, called from the entry: see there.
#[inline(never)]
fn send_new_flow(raw: *mut aya_ebpf::bindings::xdp_md) -> u64 {
    let ctx = &XdpContext { ctx: raw };
    let Some(scratch) = mem::this_cpu(&maps::SCRATCH, 0) else {
        return NEW_FLOW;
    };
    let maps::Scratch { new, ct, .. } = scratch;
    let Some(backend) = maps::BACKENDS.get(ct.backend_id) else {
        return finish((xdp_action::XDP_DROP, StatIndex::DropNoBackend), new.len);
    };
    fragments::record(&new.pkt, new.now);
    let verdict = send_to_backend(
        ctx,
        &new.pkt,
        (ct, true),
        backend,
        new.svc.id,
        (new.len, new.now),
    );
    finish(verdict, new.len)
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
fn reverse_path(
    ctx: &XdpContext,
    pkt: &Packet,
    rev: &mut ReverseNat,
    cfg: &DatapathConfig,
    len: u64,
) -> Verdict {
    if pkt.ttl <= 1 {
        return TTL_EXCEEDED;
    }
    let now = mem::now();
    rev.last_seen_ns = now;
    fragments::record(pkt, now);
    let to = Rewrite::to_client(rev);
    conntrack::mark_reply(pkt, rev, cfg);
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
