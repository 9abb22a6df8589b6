//! Stage 5: route the rewritten packet with bpf_fib_lookup and send it out: XDP_TX on
//! the interface it came in on (one-arm), bpf_redirect to another (two-arm).
//!
//! When the next hop's link-layer address is unknown, the agent is asked to resolve it
//! (XLB_NEIGH_REQ; it also keeps every backend's next hop resolved ahead of time, as a
//! managed neighbour entry). The packet itself is passed to the kernel, which resolves
//! and forwards it (needs ip_forward), unless it now comes from one of this host's own
//! IPv4 addresses (SNAT): the kernel drops such a packet as a martian source without
//! resolving anything, so it is dropped here, counted, and the client retransmits.
//!
//! The FIB's answer is cached per destination for NEXTHOP_TTL_NS, and each flow keeps a
//! copy in its own entry with the same expiry: the lookups were most of an established
//! flow's cost (docs/datapath.md). Route and neighbour changes therefore apply within
//! that time; a packet longer than any the FIB accepted for the hop goes to the FIB
//! again, so its MTU check is never skipped.

use aya_ebpf::{
    bindings::{bpf_fib_lookup, xdp_action},
    programs::XdpContext,
};
use lb_common::{Addr, NeighbourRequest, NextHop, StatIndex, FAMILY_V4};

use crate::{
    maps::{NextHopKey, NEIGHBOUR_REQUESTS, NEXTHOP, SCRATCH},
    mem::{self, bytes_mut, copied, read_once, this_cpu, write_once, zero},
};

const NEXTHOP_TTL_NS: u64 = 1_000_000_000;

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;
const BPF_FIB_LKUP_RET_FRAG_NEEDED: i64 = 8;

/// What the FIB needs to know of the rewritten packet.
pub struct Route<'a> {
    pub family: u8,
    pub proto: u8,
    pub src: &'a Addr,
    pub dst: &'a Addr,
    /// The IP packet's length, for the FIB's MTU check.
    pub tot_len: u16,
    /// The source is one of this host's addresses (SNAT): see the module's comment.
    pub own_source: bool,
}

/// The verdict, and the counter that explains it (`sent` when the packet left).
/// `now` is the packet's one clock reading (the helper is not cheap). `flow_hop` is
/// the flow's own cached next hop, when it has an entry: checked first, and refreshed
/// from the shared cache or the FIB when it is empty, expired or too short.
#[inline(always)]
pub fn forward(
    ctx: &XdpContext,
    route: &Route,
    now: u64,
    flow_hop: Option<&mut NextHop>,
    sent: StatIndex,
) -> (u32, StatIndex) {
    let ingress = ctx.ingress_ifindex() as u32;
    // The flow's copy is used in place: a copy on the stack would not fit beside a new
    // flow's entries.
    if let Some(h) = &flow_hop {
        if usable(h, now, ingress, route.tot_len) {
            return send(ctx, h, sent);
        }
    }
    let hop = match shared_hop(ctx, route, now, ingress) {
        Ok(hop) => hop,
        Err(verdict) => return verdict,
    };
    if let Some(h) = flow_hop {
        store_hop(h, &hop);
    }
    send(ctx, &hop, sent)
}

/// The next hop for `route`, as `forward` finds it, without touching the frame: for
/// the caller to change the frame (encapsulate) only once it knows the packet can go.
/// A packet too long for the hop's MTU gets `DropTooBig`, and `mtu_of_last_lookup`.
#[inline(always)]
pub fn resolve(
    ctx: &XdpContext,
    route: &Route,
    now: u64,
    flow_hop: Option<&mut NextHop>,
) -> Result<NextHop, (u32, StatIndex)> {
    let ingress = ctx.ingress_ifindex() as u32;
    if let Some(h) = &flow_hop {
        if usable(h, now, ingress, route.tot_len) {
            return Ok(**h);
        }
    }
    let hop = shared_hop(ctx, route, now, ingress)?;
    if let Some(h) = flow_hop {
        store_hop(h, &hop);
    }
    Ok(hop)
}

/// The MTU the FIB reported when its last lookup on this CPU (in this program run)
/// answered "fragmentation needed".
#[inline(always)]
pub fn mtu_of_last_lookup() -> u16 {
    this_cpu(&SCRATCH, 0).map_or(0, |s| mem::fib_mtu(&s.fib))
}

/// Writes the hop's MAC addresses into the frame and sends it out of the hop's interface.
#[inline(always)]
pub fn send(ctx: &XdpContext, hop: &NextHop, sent: StatIndex) -> (u32, StatIndex) {
    let ingress = ctx.ingress_ifindex() as u32;
    let Some(eth) = bytes_mut::<12>(ctx, 0) else {
        return (xdp_action::XDP_DROP, StatIndex::PassParseError);
    };
    eth[..6].copy_from_slice(&hop.dmac);
    eth[6..].copy_from_slice(&hop.smac);
    if hop.ifindex == ingress {
        (xdp_action::XDP_TX, sent)
    } else {
        (mem::redirect(hop.ifindex), sent)
    }
}

/// The expiry is read first: `store_hop` writes it last.
#[inline(always)]
fn usable(hop: &NextHop, now: u64, ingress: u32, tot_len: u16) -> bool {
    read_once(&hop.expires_ns) > now && hop.ingress == ingress && tot_len <= hop.max_len
}

/// Writes a flow's cached hop, which another CPU may be reading for a packet of the
/// same flow: its expiry is cleared first and written last, so no reader finds an
/// unexpired hop whose addresses are still being written (a reply once went out with
/// zero MACs so).
#[inline(always)]
fn store_hop(h: &mut NextHop, hop: &NextHop) {
    write_once(&mut h.expires_ns, 0);
    write_once(&mut h.ifindex, hop.ifindex);
    write_once(&mut h.ingress, hop.ingress);
    write_once(&mut h.max_len, hop.max_len);
    write_once(&mut h.smac, hop.smac);
    write_once(&mut h.dmac, hop.dmac);
    write_once(&mut h.expires_ns, hop.expires_ns);
}

/// The next hop from the cache shared by all flows to this destination, or from the
/// FIB (then cached for NEXTHOP_TTL_NS). A flow's copy keeps the shared entry's expiry,
/// so no copy outlives the FIB answer it came from by more than that.
#[inline(always)]
fn shared_hop(
    ctx: &XdpContext,
    route: &Route,
    now: u64,
    ingress: u32,
) -> Result<NextHop, (u32, StatIndex)> {
    let key = NextHopKey {
        dst: *route.dst,
        ingress,
        family: route.family as u32,
    };
    if let Some(hop) = copied(&NEXTHOP, &key) {
        if usable(&hop, now, ingress, route.tot_len) {
            return Ok(hop);
        }
    }
    let hop = NextHop {
        expires_ns: now + NEXTHOP_TTL_NS,
        ..fib(ctx, route, ingress)?
    };
    let _ = NEXTHOP.insert(key, hop, 0);
    Ok(hop)
}

/// bpf_fib_lookup for `src` → `dst` as if arriving on `ingress`, in `p` (the per-CPU
/// scratch's: the struct is too big for the stack). Returns the helper's code.
#[inline(always)]
pub fn query(
    ctx: &XdpContext,
    p: &mut bpf_fib_lookup,
    (family, proto): (u8, u8),
    (src, dst): (&Addr, &Addr),
    ingress: u32,
    tot_len: u16,
) -> i64 {
    zero(p);
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
    mem::fib(ctx, p)
}

/// Asks the FIB: the next hop, or the verdict when there is none to use.
#[inline(always)]
fn fib(ctx: &XdpContext, route: &Route, ingress: u32) -> Result<NextHop, (u32, StatIndex)> {
    let Route {
        family,
        proto,
        src,
        dst,
        tot_len,
        own_source,
    } = *route;
    let Some(scratch) = this_cpu(&SCRATCH, 0) else {
        return Err((xdp_action::XDP_DROP, StatIndex::DropFibFailure));
    };
    let p = &mut scratch.fib;
    let rc = query(ctx, p, (family, proto), (src, dst), ingress, tot_len);
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => Ok(NextHop {
            expires_ns: 0,
            ifindex: p.ifindex,
            ingress,
            max_len: tot_len,
            smac: p.smac,
            dmac: p.dmac,
            _pad: [0; 2],
        }),
        BPF_FIB_LKUP_RET_NO_NEIGH => {
            // The FIB filled in the next hop (the gateway, or the destination itself
            // on a connected network) and its interface. A full ring only loses the
            // request: the next packet asks again.
            let request = NeighbourRequest {
                addr: mem::fib_next_hop(p, family),
                ifindex: p.ifindex,
                family,
                _pad: [0; 3],
            };
            let _ = NEIGHBOUR_REQUESTS.output::<NeighbourRequest>(&request, 0);
            if own_source && family == FAMILY_V4 {
                Err((xdp_action::XDP_DROP, StatIndex::DropNeighbourUnknown))
            } else {
                Err((xdp_action::XDP_PASS, StatIndex::PassNeighbourUnknown))
            }
        }
        BPF_FIB_LKUP_RET_FRAG_NEEDED => Err((xdp_action::XDP_DROP, StatIndex::DropTooBig)),
        _ => Err((xdp_action::XDP_DROP, StatIndex::DropFibFailure)),
    }
}
