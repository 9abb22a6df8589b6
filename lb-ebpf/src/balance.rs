//! The two paths of a balanced packet, stage by stage: the forward path (client → VIP:
//! the flow's conntrack entry, or for a new flow the service, its source ranges,
//! Maglev, the flood guard, nat's port and the entries; then the rewrite or dsr's
//! encapsulation and the route) and the reverse path (a backend's reply to a nat or
//! dnat flow, translated back). main.rs calls them from the entry and its BPF
//! functions; the stages they call do the work.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{
    flow_hash, Backend, ConnValue, DatapathConfig, NextHop, ReverseNat, ServiceValue, StatIndex,
    BACKEND_F_SVC_SOURCE_RANGES, MODE_DSR, MODE_NAT, SVC_F_SOURCE_RANGES, SVC_F_STATELESS,
};

use crate::{
    allow, conntrack, decap, flood, forward, fragments, lookup, maglev, maps, mem,
    nat::{self, Rewrite},
    packet::{Packet, Verdict},
    stats, tunnel,
};

/// Untouched, so the kernel answers with ICMP time exceeded from the right address.
const TTL_EXCEEDED: Verdict = (xdp_action::XDP_PASS, StatIndex::PassTtlExceeded);

/// What the forward path returns for a new flow it left in scratch memory
/// (maps::NewFlow) for the entry's next calls to balance: no XDP action is this.
pub const NEW_FLOW_ACTION: u32 = u32::MAX;

/// A client's packet to a service (forward path) or a backend's reply to a NAT flow
/// (reverse path); anything else passes. A decapsulated packet's service is looked
/// up first (only `encapsulated` services apply to it), and none means it is not for
/// us. One call of the forward path for both kinds of packet, so that it is inlined
/// once.
#[inline(always)]
pub fn balance(ctx: &XdpContext, pkt: &Packet, len: u64, decapsulated: bool) -> Verdict {
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
    reply_or_not_a_vip(ctx, pkt, cfg, len)
}

/// A packet for no service: a backend's reply to a NAT flow, or the host's own traffic.
#[inline(always)]
fn reply_or_not_a_vip(ctx: &XdpContext, pkt: &Packet, cfg: &DatapathConfig, len: u64) -> Verdict {
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
    if let Some(flow) = found {
        return Some(established(ctx, pkt, flow, (hash, cfg), (len, now)));
    }
    let svc = match early {
        Some(svc) => svc,
        None => lookup::service(key, false)?,
    };
    new_flow(pkt, svc, hash, (len, now))
}

/// A new flow of service `svc`, once its source is admitted: left in scratch memory
/// for the entry's next calls, which balance and send it (NEW_FLOW_ACTION).
#[inline(always)]
fn new_flow(pkt: &Packet, svc: ServiceValue, hash: u32, (len, now): (u64, u64)) -> Option<Verdict> {
    let key = &pkt.key;
    let restricted = svc.flags & SVC_F_SOURCE_RANGES != 0;
    if let Err(verdict) = allow::check(restricted, svc.id, key.family, &key.src) {
        return Some(verdict);
    }
    let scratch = mem::this_cpu(&maps::SCRATCH, 0)?;
    scratch.new = maps::NewFlow {
        pkt: *pkt,
        svc,
        hash,
        len,
        now,
    };
    Some((NEW_FLOW_ACTION, StatIndex::FwdForward))
}

/// A packet of an established flow (its entry and backend, from conntrack::lookup):
/// checked against its service's source ranges, then sent to its backend.
#[inline(always)]
fn established(
    ctx: &XdpContext,
    pkt: &Packet,
    (ct, backend): (&mut ConnValue, &Backend),
    (hash, cfg): (u32, &DatapathConfig),
    (len, now): (u64, u64),
) -> Verdict {
    let key = &pkt.key;
    // The ranges may have changed since the flow began: it is cut.
    let restricted = backend.flags & BACKEND_F_SVC_SOURCE_RANGES != 0;
    if let Err(verdict) = allow::check(restricted, backend.service_id, key.family, &key.src) {
        conntrack::cut(key, hash, ct, backend, cfg);
        return verdict;
    }
    fragments::record(pkt, now);
    // Untouched, so the kernel answers with ICMP time exceeded from the right address.
    if pkt.ttl <= 1 {
        return TTL_EXCEEDED;
    }
    send_to_backend(ctx, pkt, (ct, false), backend, (len, now))
}

/// The entry's fast path (main.rs): the common packet (`parsed` by parse::common_v4
/// or common_v6) of an established flow, a reply to a NAT flow, or the host's own
/// traffic, as the pipeline would handle it, in a BPF function small enough for its
/// values to stay in registers; a stateless dsr service's packet (`stateless`); and a
/// new flow's first packet, up to what the pipeline's forward path leaves for the
/// entry's next calls (NEW_FLOW_ACTION). Returns the packet's `Seen*` counter and its
/// verdict; None when the pipeline is to handle the packet from the start (anything
/// else): nothing has been changed or counted then.
#[inline(always)]
pub fn common(
    ctx: &XdpContext,
    len: u64,
    parsed: Option<(StatIndex, Packet)>,
) -> Option<(StatIndex, Verdict)> {
    let (seen, pkt) = parsed?;
    let cfg = maps::CONFIG.get(0)?;
    let key = &pkt.key;
    // As `balance`, for a packet that is not decapsulated: a TCP or UDP packet never is.
    let verdict = if lookup::may_be_service(key, cfg) {
        let now = mem::now();
        let hash = flow_hash(key, false);
        if lookup::may_be_stateless(key) {
            let svc = lookup::service(key, false);
            let verdict = stateless(ctx, &pkt, (svc, hash), (len, now))?;
            return Some((seen, verdict));
        }
        match conntrack::lookup(key, hash, pkt.tcp_flags, now, cfg) {
            Some(flow) => established(ctx, &pkt, flow, (hash, cfg), (len, now)),
            // A new flow goes on to its calls from here, not from the pipeline's start
            // (its parse and lookups again). A miss changes nothing (conntrack::lookup):
            // no service, and the pipeline takes the packet from the start.
            None => new_flow(&pkt, lookup::service(key, false)?, hash, (len, now))?,
        }
    } else {
        reply_or_not_a_vip(ctx, &pkt, cfg, len)
    };
    Some((seen, verdict))
}

/// A stateless dsr service's packet (`conntrack: false`), on the fast path: Maglev
/// picks its backend and it is encapsulated and sent, with no entry and no scratch
/// memory, as the pipeline's new flow would be. None (nothing changed or counted)
/// for anything the pipeline is to decide: no such service or a stateful one that
/// shares its filter bit, no backend, a dnat service (whose replies need an entry).
#[inline(always)]
fn stateless(
    ctx: &XdpContext,
    pkt: &Packet,
    (svc, hash): (Option<ServiceValue>, u32),
    (len, now): (u64, u64),
) -> Option<Verdict> {
    let svc = svc.filter(|s| s.flags & SVC_F_STATELESS != 0)?;
    let key = &pkt.key;
    let (backend_id, backend) = maglev::pick(&svc, key, hash)?;
    if backend.mode() != MODE_DSR {
        return None;
    }
    // In the pipeline's order from here: the ranges, the TTL, the source address.
    let restricted = svc.flags & SVC_F_SOURCE_RANGES != 0;
    if let Err(verdict) = allow::check(restricted, svc.id, key.family, &key.src) {
        return Some(verdict);
    }
    if pkt.ttl <= 1 {
        return Some(TTL_EXCEEDED);
    }
    let snat = match nat::source(backend, MODE_DSR) {
        Ok(snat) => snat,
        Err(verdict) => return Some(verdict),
    };
    let outer_dst = tunnel::outer_destination(backend_id, &backend.addr);
    Some(tunnel::send(
        ctx,
        pkt,
        (&snat, &outer_dst),
        backend_id,
        (len, now),
        None,
    ))
}

#[inline(always)]
pub fn decide_new_flow(
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
/// flow's, from what `decide_new_flow` left in scratch memory.
#[inline(always)]
pub fn send_new_flow(ctx: &XdpContext, new: &maps::NewFlow, ct: &mut ConnValue) -> Verdict {
    let Some(backend) = maps::BACKENDS.get(ct.backend_id) else {
        return (xdp_action::XDP_DROP, StatIndex::DropNoBackend);
    };
    fragments::record(&new.pkt, new.now);
    send_to_backend(ctx, &new.pkt, (ct, true), backend, (new.len, new.now))
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
    (len, now): (u64, u64),
) -> Verdict {
    let flow_hop = (!new_flow).then_some(&mut ct.hop);
    if backend.mode() == MODE_DSR {
        let outer_dst = tunnel::outer_destination(ct.backend_id, &backend.addr);
        let outer = (&ct.nat_addr, &outer_dst);
        return tunnel::send(ctx, pkt, outer, ct.backend_id, (len, now), flow_hop);
    }
    let to = Rewrite::to_backend((ct.nat_addr, ct.nat_port), backend);
    translate_and_send(
        ctx,
        pkt,
        &to,
        ct.backend_id,
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
    let backend_id = rev.backend_id;
    let flow_hop = Some(&mut rev.hop);
    translate_and_send(
        ctx,
        pkt,
        &to,
        backend_id,
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
    backend_id: u32,
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
    stats::count_flow(backend_id, len, new_flow);
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
