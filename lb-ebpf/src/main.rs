//! xlb's XDP program. The pipeline reads top to bottom (see docs/design.md):
//! parse → VIP filter → conntrack, or on a miss service lookup and Maglev → NAT
//! rewrite → FIB forward, with the reverse path for replies. Each stage is a module;
//! this file only wires them.
// On the host (cargo clippy/build --workspace) this compiles as an empty binary, so
// the code is still type-checked and linted; the real build is for target_arch = "bpf".
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

mod allow;
mod bench;
mod conntrack;
mod echo;
mod egress;
mod flood;
mod forward;
mod fragments;
mod l2;
mod lookup;
mod maglev;
mod maps;
mod mem;
mod nat;
mod parse;
mod redirect;
mod stats;
mod trace;
mod tunnel;

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_ktime_get_coarse_ns,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use lb_common::{
    Addr, ConnValue, DatapathConfig, FlowKey, NextHop, ReverseNat, ServiceValue, StatIndex,
    BACKEND_F_SVC_SOURCE_RANGES, FAMILY_V4, MODE_DNAT, MODE_DSR, MODE_NAT, PROTO_TCP,
    SVC_F_SOURCE_RANGES,
};

use crate::{
    nat::Rewrite,
    parse::{IcmpError, Packet, Parsed},
};

type Verdict = (u32, StatIndex);

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
    // The backend's side of dsr: the tunnel's header goes, and the inner packet is
    // what the rest of the pipeline sees.
    let decapsulated =
        maps::CONFIG.get(0).is_some_and(|c| c.decap != 0) && tunnel::decapsulate(ctx).is_some();
    let len = (ctx.data_end() - ctx.data()) as u64;
    let (seen, parsed) = parse::parse(ctx);
    stats::count(seen, len);
    let (action, reason) = match parsed {
        // A later fragment takes its first's ports first (one Packet for both kinds:
        // the stack has no room for a second).
        Ok(Parsed::Flow(mut pkt)) => match fragments::follow(&mut pkt) {
            Ok(()) => {
                trace::note(Some(&pkt.key));
                balance(ctx, &pkt, len, decapsulated)
            }
            Err(verdict) => {
                trace::note(Some(&pkt.key));
                verdict
            }
        },
        _ if decapsulated => (xdp_action::XDP_PASS, StatIndex::PassDecapsulated),
        Ok(Parsed::Icmp(outer)) => {
            trace::note(Some(&outer.key));
            if outer.key.proto == parse::IPPROTO_ICMPV6
                && l2::neighbour_solicitation(ctx, &outer).is_some()
            {
                (xdp_action::XDP_TX, StatIndex::L2Answered)
            } else if echo::answer(ctx, &outer).is_some() {
                (xdp_action::XDP_TX, StatIndex::IcmpEchoAnswered)
            } else {
                icmp_error(ctx, &outer)
            }
        }
        Err(StatIndex::PassNotIp) if l2::arp(ctx).is_some() => {
            trace::note(None);
            (xdp_action::XDP_TX, StatIndex::L2Answered)
        }
        Err(reason) => {
            trace::note(None);
            (xdp_action::XDP_PASS, reason)
        }
    };
    stats::count(reason, len);
    action as u64 | (reason as u64) << 32
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

/// `decapsulated`: the packet came out of a tunnel to this host. Only services for
/// such packets apply, and anything else goes to the kernel (a VIP on its loopback).
#[inline(always)]
fn balance(ctx: &XdpContext, pkt: &Packet, len: u64, decapsulated: bool) -> Verdict {
    // A reference into the map, not a copy: the stack is the scarce resource.
    let Some(cfg) = maps::CONFIG.get(0) else {
        return (xdp_action::XDP_PASS, StatIndex::PassNotVip);
    };
    // Decapsulated packets are for this host's `encapsulated` services only: theirs is
    // looked up first, and none means the packet is not for us. One call of the
    // forward path for both kinds of packet, so that it is inlined once.
    let not_for_us = (xdp_action::XDP_PASS, StatIndex::PassDecapsulated);
    let decap_svc = if decapsulated {
        match lookup::service(&pkt.key, true) {
            Some(svc) => Some(svc),
            None => return not_for_us,
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
        return not_for_us;
    }
    // A nat reply comes to a port of the SNAT range, which is kept apart from the
    // host's own ephemeral ports: the rest of the host's traffic skips the lookup.
    let dport = u16::from_be(pkt.key.dport);
    let maybe_reply =
        cfg.dnat_in_use != 0 || (dport >= cfg.snat_port_min && dport <= cfg.snat_port_max);
    if maybe_reply {
        if let Some(rev) = lookup::reverse(&pkt.key) {
            return reverse_path(ctx, pkt, rev, len);
        }
    }
    (xdp_action::XDP_PASS, StatIndex::PassNotVip)
}

/// Client → VIP: keep the flow's backend, or pick one by Maglev; DNAT + SNAT; send.
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
    // SAFETY: a plain helper call.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let (ct, backend, service_id, new) = match conntrack::lookup(key, pkt.tcp_flags, now, cfg) {
        Some((ct, backend)) => {
            // The ranges may have changed since the flow began: it is cut.
            if backend.flags & BACKEND_F_SVC_SOURCE_RANGES != 0
                && !allow::admits(backend.service_id, key.family, &key.src)
            {
                conntrack::cut(key, ct, backend);
                return Some(denied(backend.service_id));
            }
            (ct, backend, backend.service_id, false)
        }
        None => {
            let svc = match svc {
                Some(svc) => *svc,
                None => lookup::service(key, false)?,
            };
            if svc.flags & SVC_F_SOURCE_RANGES != 0 && !allow::admits(svc.id, key.family, &key.src)
            {
                return Some(denied(svc.id));
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
        return Some((xdp_action::XDP_PASS, StatIndex::PassTtlExceeded));
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

/// A client outside the service's source ranges: dropped, counted per service.
#[inline(always)]
fn denied(service_id: u32) -> Verdict {
    stats::count_denied(service_id);
    (xdp_action::XDP_DROP, StatIndex::DropSourceDenied)
}

/// A new flow: its backend by Maglev, its SNAT port, and its entries (unless the flood
/// guard is on). The returned entry is the scratch copy of what went into the map.
#[inline(always)]
fn new_flow<'run>(
    pkt: &Packet,
    svc: &ServiceValue,
    cfg: &DatapathConfig,
    len: u64,
    now: u64,
) -> Result<(&'run mut ConnValue, &'static lb_common::Backend), Verdict> {
    // No entry for a packet that will not be forwarded (see forward_path).
    if pkt.ttl <= 1 {
        return Err((xdp_action::XDP_PASS, StatIndex::PassTtlExceeded));
    }
    let key = &pkt.key;
    let Some((backend_id, backend)) = maglev::pick(svc, key) else {
        return Err((xdp_action::XDP_DROP, StatIndex::DropNoBackend));
    };
    // nat's source, and dsr's outer source; dnat keeps the client's.
    let snat = backend.snat;
    let mode = backend.mode();
    if snat == [0; 4] && mode != MODE_DNAT {
        return Err((xdp_action::XDP_DROP, StatIndex::DropNoSnatAddress));
    }
    // Above the new-flow rate no entry is made: nat cannot do without one.
    let flooded = flood::over_limit(now, cfg);
    if flooded && mode == MODE_NAT {
        return Err((xdp_action::XDP_DROP, StatIndex::DropFloodNat));
    }
    // Never missing: a per-CPU array of one.
    let Some(scratch) = maps::SCRATCH.get_ptr_mut(0) else {
        return Err((xdp_action::XDP_DROP, StatIndex::DropPortAlloc));
    };
    // SAFETY: this CPU's scratch slot; nothing else uses it during this run.
    let scratch = unsafe { &mut *scratch };
    // The next hop is kept in the literal and zeroed after it, word by word: a zeroed
    // part of a literal is a memset (see mem::zero).
    scratch.rev = ReverseNat {
        client: key.src,
        vip: key.dst,
        client_port: key.sport,
        vip_port: key.dport,
        service_id: svc.id,
        backend_id,
        _pad: 0,
        last_seen_ns: now,
        hop: scratch.rev.hop,
    };
    mem::zero(&mut scratch.rev.hop);
    let rev = &scratch.rev;
    // Where the backend's replies are recognised, and the source the backend sees.
    let (nat_addr, nat_port) = match mode {
        MODE_NAT => {
            let Some(port) = nat::alloc_port(key, backend.addr, backend.port, snat, cfg, rev)
            else {
                return Err((xdp_action::XDP_DROP, StatIndex::DropPortAlloc));
            };
            (snat, port)
        }
        MODE_DNAT => {
            nat::claim_reply(key, backend.addr, backend.port, rev);
            (key.src, key.sport)
        }
        // No reply comes back: the backend answers the client itself.
        _ => (snat, 0),
    };
    scratch.ct = ConnValue {
        backend_id,
        nat_port,
        flags: conntrack::flags_from_tcp(pkt.tcp_flags),
        _pad: 0,
        nat_addr,
        last_seen_ns: now,
        hop: scratch.ct.hop,
    };
    mem::zero(&mut scratch.ct.hop);
    if flooded {
        // Maglev alone: the next packet of this flow picks the same backend.
        stats::count(StatIndex::EventFloodStateless, len);
    } else {
        conntrack::insert(key, &scratch.ct);
    }
    if key.proto == PROTO_TCP && pkt.tcp_flags & parse::TCP_SYN == 0 {
        stats::count(StatIndex::EventFlowRecreated, len);
    }
    Ok((&mut scratch.ct, backend))
}

/// DNAT + SNAT (nat, dnat) or encapsulation (dsr), then the route to the backend.
/// A new flow's `ct` is the scratch copy of its entry: only an entry found in the map
/// keeps the next hop it is given.
#[inline(always)]
fn send_to_backend(
    ctx: &XdpContext,
    pkt: &Packet,
    (ct, new_flow): (&mut ConnValue, bool),
    backend: &lb_common::Backend,
    service_id: u32,
    (len, now): (u64, u64),
) -> Verdict {
    let ids = (service_id, ct.backend_id);
    let flow_hop = (!new_flow).then_some(&mut ct.hop);
    if backend.mode() == MODE_DSR {
        let tunnel = maps::BACKEND_TUNNELS
            .get(ct.backend_id)
            .copied()
            .unwrap_or_default();
        let outer_dst = if tunnel != [0; 4] {
            tunnel
        } else {
            backend.addr
        };
        return encapsulate_and_send(
            ctx,
            pkt,
            (&ct.nat_addr, &outer_dst),
            ids,
            (len, now),
            flow_hop,
        );
    }
    let to = Rewrite {
        src: ct.nat_addr,
        dst: backend.addr,
        sport: ct.nat_port,
        dport: backend.port,
    };
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

/// dsr: the packet, unchanged, inside an outer header from `outer.0` (this host) to
/// the backend `outer.1`. The next hop is found first, for the encapsulated length: a
/// packet that would no longer fit is answered with ICMP too-big instead.
#[inline(always)]
fn encapsulate_and_send(
    ctx: &XdpContext,
    pkt: &Packet,
    (outer_src, outer_dst): (&Addr, &Addr),
    (service_id, backend_id): (u32, u32),
    (len, now): (u64, u64),
    flow_hop: Option<&mut NextHop>,
) -> Verdict {
    let k = &pkt.key;
    let new_flow = flow_hop.is_none();
    let overhead = tunnel::overhead(k.family);
    let route = forward::Route {
        family: k.family,
        proto: if k.family == lb_common::FAMILY_V4 {
            tunnel::IPPROTO_IPIP
        } else {
            tunnel::IPPROTO_IPV6
        },
        src: outer_src,
        dst: outer_dst,
        tot_len: pkt.ip_len.saturating_add(overhead),
        own_source: true,
    };
    let hop = match forward::resolve(ctx, &route, now, flow_hop) {
        Ok(hop) => hop,
        // A fragment carries no DF: nothing asked for an ICMP answer (IPv6 always does).
        Err((_, StatIndex::DropTooBig))
            if pkt.frag != parse::FRAG_NONE && k.family == FAMILY_V4 =>
        {
            return (xdp_action::XDP_DROP, StatIndex::DropFragmentTooBig);
        }
        Err((_, StatIndex::DropTooBig)) => {
            let mtu = forward::mtu_of_last_lookup().saturating_sub(overhead);
            return match tunnel::too_big(ctx, pkt, mtu) {
                Some(()) => (xdp_action::XDP_TX, StatIndex::IcmpTooBigSent),
                None => (xdp_action::XDP_DROP, StatIndex::DropTooBig),
            };
        }
        Err(verdict) => return verdict,
    };
    if tunnel::encapsulate(ctx, pkt, outer_src, outer_dst).is_none() {
        return (xdp_action::XDP_DROP, StatIndex::DropEncapFailed);
    }
    stats::count_flow(service_id, backend_id, len, new_flow);
    forward::send(ctx, &hop, StatIndex::FwdForward)
}

/// Backend → SNAT address: translate back to VIP → client and send.
#[inline(always)]
fn reverse_path(ctx: &XdpContext, pkt: &Packet, rev: *mut ReverseNat, len: u64) -> Verdict {
    if pkt.ttl <= 1 {
        return (xdp_action::XDP_PASS, StatIndex::PassTtlExceeded);
    }
    // SAFETY: a valid map value pointer for the duration of this run.
    let rev = unsafe { &mut *rev };
    // SAFETY: a plain helper call.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    rev.last_seen_ns = now;
    fragments::record(pkt, now);
    let to = Rewrite {
        src: rev.vip,
        dst: rev.client,
        sport: rev.vip_port,
        dport: rev.client_port,
    };
    // A FIN or RST from the backend closes the flow as one from the client does: its
    // conntrack entry takes the short closing timeout.
    if pkt.tcp_flags & (parse::TCP_FIN | parse::TCP_RST) != 0 {
        let forward_key = FlowKey {
            src: rev.client,
            dst: rev.vip,
            sport: rev.client_port,
            dport: rev.vip_port,
            ..pkt.key
        };
        conntrack::mark(&forward_key, pkt.tcp_flags);
    }
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

/// An ICMP error about a NAT flow is translated like the flow's own packets, so that
/// Path MTU discovery and unreachables work through xlb:
/// - quoting our forwarded packet (SNAT → backend): it goes back to the client, about
///   client → VIP;
/// - quoting our reply (VIP → client): it goes on to the backend, about backend → SNAT.
#[inline(always)]
fn icmp_error(ctx: &XdpContext, outer: &Packet) -> Verdict {
    let Some(scratch) = maps::ICMP_SCRATCH.get_ptr_mut(0) else {
        return (xdp_action::XDP_PASS, StatIndex::PassIcmpNotRelated);
    };
    // SAFETY: this CPU's scratch slot; nothing else uses it during this run.
    let scratch = unsafe { &mut *scratch };
    if let Err(reason) = parse::parse_icmp_error(ctx, outer, &mut scratch.err) {
        return (xdp_action::XDP_PASS, reason);
    }
    let e = &scratch.err;
    if e.outer.ttl <= 1 {
        return (xdp_action::XDP_PASS, StatIndex::PassTtlExceeded);
    }
    let q = &e.inner;
    scratch.reply_key = FlowKey {
        src: q.dst,
        dst: q.src,
        sport: q.dport,
        dport: q.sport,
        ..*q
    };
    let e = &scratch.err;
    // SAFETY: a plain helper call.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if let Some(rev) = lookup::reverse(&scratch.reply_key) {
        // SAFETY: a valid map value pointer for the duration of this run.
        let rev = unsafe { &*rev };
        // About a flow of a client the service no longer admits: its flow is cut.
        let restricted = maps::BACKENDS
            .get(rev.backend_id)
            .is_some_and(|b| b.flags & BACKEND_F_SVC_SOURCE_RANGES != 0);
        let family = scratch.reply_key.family;
        if restricted && !allow::admits(rev.service_id, family, &rev.client) {
            return denied(rev.service_id);
        }
        // To the client, about its own client → VIP packet.
        let inner = Rewrite {
            src: rev.client,
            dst: rev.vip,
            sport: rev.client_port,
            dport: rev.vip_port,
        };
        return icmp_translate(ctx, e, (&rev.vip, &rev.client), &inner, now, false);
    }
    if let Some(cfg) = maps::CONFIG.get(0) {
        if let Some((ct, backend)) = conntrack::lookup(&scratch.reply_key, 0, now, cfg) {
            if backend.flags & BACKEND_F_SVC_SOURCE_RANGES != 0
                && !allow::admits(
                    backend.service_id,
                    scratch.reply_key.family,
                    &scratch.reply_key.src,
                )
            {
                return denied(backend.service_id);
            }
            // To the backend, about its own backend → SNAT packet.
            let inner = Rewrite {
                src: backend.addr,
                dst: ct.nat_addr,
                sport: backend.port,
                dport: ct.nat_port,
            };
            return icmp_translate(ctx, e, (&ct.nat_addr, &backend.addr), &inner, now, true);
        }
    }
    (xdp_action::XDP_PASS, StatIndex::PassIcmpNotRelated)
}

/// Rewrites the error to come from `outer_src` to `outer_dst`, quoting `inner`, and sends it.
#[inline(always)]
fn icmp_translate(
    ctx: &XdpContext,
    e: &IcmpError,
    (outer_src, outer_dst): (&Addr, &Addr),
    inner: &Rewrite,
    now: u64,
    own_source: bool,
) -> Verdict {
    if nat::rewrite_icmp_error(ctx, e, outer_src, outer_dst, inner).is_none() {
        return (xdp_action::XDP_PASS, StatIndex::PassParseError);
    }
    let k = &e.outer.key;
    let route = forward::Route {
        family: k.family,
        proto: k.proto,
        src: outer_src,
        dst: outer_dst,
        tot_len: e.outer.ip_len,
        own_source,
    };
    forward::forward(ctx, &route, now, None, StatIndex::IcmpTranslated)
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
