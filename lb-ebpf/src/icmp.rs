//! Stage 2c, ICMP errors: an error about a NAT flow is translated like the flow's own
//! packets, so that Path MTU discovery and unreachables work through xlb:
//! - quoting our forwarded packet (SNAT → backend): it goes back to the client, about
//!   client → VIP;
//! - quoting our reply (VIP → client): it goes on to the backend, about backend → SNAT.
//!
//! Its state lives in per-CPU scratch memory (XLB_ICMP_SCRATCH): it does not fit the
//! 512-byte stack beside the rest of the pipeline.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{flow_hash, Addr, FlowKey, StatIndex, BACKEND_F_SVC_SOURCE_RANGES};

use crate::{
    allow, conntrack, forward, lookup,
    maps::{BACKENDS, CONFIG, ICMP_SCRATCH},
    mem::{self, this_cpu},
    nat::{self, Rewrite},
    packet::{IcmpError, Packet, Verdict},
    parse,
};

/// An ICMP packet that is not an echo request to a VIP: translated if it is an error
/// about a flow of ours, else passed.
#[inline(always)]
pub fn error(ctx: &XdpContext, outer: &Packet) -> Verdict {
    let Some(scratch) = this_cpu(&ICMP_SCRATCH, 0) else {
        return (xdp_action::XDP_PASS, StatIndex::PassIcmpNotRelated);
    };
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
    let now = mem::now();
    let Some(cfg) = CONFIG.get(0) else {
        return (xdp_action::XDP_PASS, StatIndex::PassIcmpNotRelated);
    };
    if let Some(rev) = lookup::reverse(&scratch.reply_key, cfg) {
        // About a flow of a client the service no longer admits: refused, as the
        // flow's own packets are.
        let restricted = BACKENDS
            .get(rev.backend_id)
            .is_some_and(|b| b.flags & BACKEND_F_SVC_SOURCE_RANGES != 0);
        let family = scratch.reply_key.family;
        if let Err(verdict) = allow::check(restricted, rev.service_id, family, &rev.client) {
            return verdict;
        }
        // To the client, about its own client → VIP packet.
        let inner = Rewrite {
            src: rev.client,
            dst: rev.vip,
            sport: rev.client_port,
            dport: rev.vip_port,
        };
        return translate(ctx, e, (&rev.vip, &rev.client), &inner, now, false);
    }
    let hash = flow_hash(&scratch.reply_key, false);
    if let Some((ct, backend)) = conntrack::lookup(&scratch.reply_key, hash, 0, now, cfg) {
        let restricted = backend.flags & BACKEND_F_SVC_SOURCE_RANGES != 0;
        let (family, client) = (scratch.reply_key.family, &scratch.reply_key.src);
        if let Err(verdict) = allow::check(restricted, backend.service_id, family, client) {
            return verdict;
        }
        // To the backend, about its own backend → SNAT packet.
        let inner = Rewrite {
            src: backend.addr,
            dst: ct.nat_addr,
            sport: backend.port,
            dport: ct.nat_port,
        };
        return translate(ctx, e, (&ct.nat_addr, &backend.addr), &inner, now, true);
    }
    (xdp_action::XDP_PASS, StatIndex::PassIcmpNotRelated)
}

/// Rewrites the error to come from `outer_src` to `outer_dst`, quoting `inner`, and sends it.
#[inline(always)]
fn translate(
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
