//! Stage 4: address and port translation, with incremental checksum updates
//! (csum.rs), and the SNAT port allocator.

use aya_ebpf::bindings::xdp_action;
use aya_ebpf::programs::XdpContext;
use lb_common::{
    flow_hash, Addr, Backend, DatapathConfig, FlowKey, ReverseNat, StatIndex, FAMILY_V4, MODE_DNAT,
    MODE_NAT, PROTO_TCP, PROTO_UDP,
};
use network_types::ip::Ipv4Hdr;

use crate::{
    csum::Delta,
    flows::{self, Insert},
    maps::{CONFIG, SCRATCH},
    mem::{self, bytes_mut, load, put_addr, store, zero},
    packet::{IcmpError, Packet, Verdict, ETH_LEN, FRAG_LATER},
    stats,
};

/// Offsets in the IPv6 header: next header (hop limit follows), source (the
/// destination follows).
const IPV6_NEXT_HDR_OFF: usize = 6;
const IPV6_SRC_OFF: usize = 8;

/// How many ports the allocator tries before it gives up (and counts a drop). With 8,
/// `cargo xtask bench` saw a failure at 33% occupancy of the range (0.33^8 ≈ 1e-4 per
/// flow); 32 (as Cilium uses) makes it ~1e-15 there and ~1e-9 at 50%.
const PORT_PROBES: u32 = 32;

/// What a packet is rewritten to.
pub struct Rewrite {
    pub src: Addr,
    pub dst: Addr,
    /// Network byte order.
    pub sport: u16,
    pub dport: u16,
}

impl Rewrite {
    /// A client's packet: from the flow's source (nat's SNAT address and port, or
    /// dnat's client: a conntrack entry's `nat_addr` and `nat_port`) to the backend.
    #[inline(always)]
    pub fn to_backend((src, sport): (Addr, u16), backend: &Backend) -> Self {
        Rewrite {
            src,
            dst: backend.addr,
            sport,
            dport: backend.port,
        }
    }

    /// A backend's reply: from the VIP back to the client.
    #[inline(always)]
    pub fn to_client(rev: &ReverseNat) -> Self {
        Rewrite {
            src: rev.vip,
            dst: rev.client,
            sport: rev.vip_port,
            dport: rev.client_port,
        }
    }
}

/// A new flow's source towards `backend`: nat's SNAT address, and dsr's outer source;
/// dnat keeps the client's and needs none.
#[inline(always)]
pub fn source(backend: &Backend, mode: u8) -> Result<Addr, Verdict> {
    if backend.snat == [0; 4] && mode != MODE_DNAT {
        return Err((xdp_action::XDP_DROP, StatIndex::DropNoSnatAddress));
    }
    Ok(backend.snat)
}

/// A new flow's reply entry, written into `rev` (per-CPU scratch) for `claim`. The
/// next hop is kept in the literal and zeroed after it, word by word: a zeroed part
/// of a literal is a memset (see mem::zero).
#[inline(always)]
pub fn reply_entry(rev: &mut ReverseNat, key: &FlowKey, ids: (u32, u32), now: u64) {
    let (service_id, backend_id) = ids;
    *rev = ReverseNat {
        client: key.src,
        vip: key.dst,
        client_port: key.sport,
        vip_port: key.dport,
        service_id,
        backend_id,
        flags: 0,
        _pad: [0; 3],
        last_seen_ns: now,
        hop: rev.hop,
    };
    zero(&mut rev.hop);
}

/// Where the backend's replies to a new flow are recognised, and the source the
/// backend sees (address, port in network order): nat allocates a port of `snat` and
/// dnat claims the client's own; dsr makes no entry (the backend answers the client
/// itself).
#[inline(always)]
pub fn claim(
    key: &FlowKey,
    (backend, mode): (&Backend, u8),
    snat: Addr,
    cfg: &DatapathConfig,
    rev: &ReverseNat,
) -> Result<(Addr, u16), Verdict> {
    match mode {
        MODE_NAT => {
            let to = (backend.addr, backend.port);
            let Some(port) = alloc_port(key, to, snat, cfg, rev) else {
                return Err((xdp_action::XDP_DROP, StatIndex::DropPortAlloc));
            };
            Ok((snat, port))
        }
        MODE_DNAT => {
            claim_reply(key, backend.addr, backend.port, cfg, rev);
            Ok((key.src, key.sport))
        }
        _ => Ok((snat, 0)),
    }
}

/// Rewrites the outer IP header's addresses, decrements TTL / hop limit and fixes the
/// IPv4 header checksum.
#[inline(always)]
fn rewrite_ip(ctx: &XdpContext, family: u8, to_src: &Addr, to_dst: &Addr) -> Option<()> {
    if family == FAMILY_V4 {
        // TTL, protocol and checksum, then the two addresses: three words (mem::load).
        let [ttl_proto_check, from_src, from_dst] = load::<[u32; 3]>(ctx, ETH_LEN + 8)?;
        let [ttl, proto, c0, c1] = ttl_proto_check.to_ne_bytes();
        let ttl_after = ttl.wrapping_sub(1);
        let check = Delta::new()
            .half(
                u16::from_ne_bytes([ttl, proto]),
                u16::from_ne_bytes([ttl_after, proto]),
            )
            .words(&[from_src, 0, 0, 0], to_src, 1)
            .words(&[from_dst, 0, 0, 0], to_dst, 1)
            .apply(u16::from_ne_bytes([c0, c1]))
            .to_ne_bytes();
        let ttl_proto_check = u32::from_ne_bytes([ttl_after, proto, check[0], check[1]]);
        store(ctx, ETH_LEN + 8, [ttl_proto_check, to_src[0], to_dst[0]])
    } else {
        // Field by field: a whole 40-byte header copy costs stack the ICMP path lacks.
        let hop_limit = load::<[u8; 2]>(ctx, ETH_LEN + IPV6_NEXT_HDR_OFF)?;
        store(
            ctx,
            ETH_LEN + IPV6_NEXT_HDR_OFF,
            [hop_limit[0], hop_limit[1] - 1],
        )?;
        // Byte by byte through put_addr: an unaligned store of a whole address is a
        // memmove, a call to a byte loop on BPF (see mem::zero).
        let addrs = bytes_mut::<32>(ctx, ETH_LEN + IPV6_SRC_OFF)?;
        put_addr(&mut addrs[..16], to_src);
        put_addr(&mut addrs[16..], to_dst);
        Some(())
    }
}

/// Rewrites addresses and ports, decrements TTL / hop limit, and fixes the IPv4 header
/// checksum and the TCP/UDP checksum. None if the headers are no longer reachable.
#[inline(always)]
pub fn rewrite(ctx: &XdpContext, pkt: &Packet, to: &Rewrite) -> Option<()> {
    let k = &pkt.key;
    let words = if k.family == FAMILY_V4 { 1 } else { 4 };
    rewrite_ip(ctx, k.family, &to.src, &to.dst)?;
    // A later fragment holds no transport header: the first fragment's checksum
    // update covers the whole datagram's, pseudo-header included.
    if pkt.frag == FRAG_LATER {
        return Some(());
    }
    // Ports, then the transport checksum (it covers the pseudo-header addresses too).
    store(ctx, pkt.l4_off, [to.sport, to.dport])?;
    let check_off = match k.proto {
        PROTO_TCP => pkt.l4_off + 16,
        _ => pkt.l4_off + 6,
    };
    let old = load::<u16>(ctx, check_off)?;
    // An IPv4 UDP checksum of 0 means "none" and must stay 0.
    if k.proto == PROTO_UDP && k.family == FAMILY_V4 && old == 0 {
        return Some(());
    }
    let mut check = Delta::new()
        .words(&k.src, &to.src, words)
        .words(&k.dst, &to.dst, words)
        .half(k.sport, to.sport)
        .half(k.dport, to.dport)
        .apply(old);
    if k.proto == PROTO_UDP && check == 0 {
        check = 0xffff;
    }
    store(ctx, check_off, check)
}

/// Translates an ICMP error about a NAT flow: the outer header to `outer_src` →
/// `outer_dst`, and the quoted packet to `inner`, fixing the quoted IPv4 header's
/// checksum and the ICMP checksum (which for ICMPv6 covers the outer pseudo-header).
/// The quoted transport checksum is left alone: it is usually truncated away, and
/// no receiver checks it.
#[inline(always)]
pub fn rewrite_icmp_error(
    ctx: &XdpContext,
    e: &IcmpError,
    outer_src: &Addr,
    outer_dst: &Addr,
    inner: &Rewrite,
) -> Option<()> {
    let family = e.outer.key.family;
    let words = if family == FAMILY_V4 { 1 } else { 4 };
    rewrite_ip(ctx, family, outer_src, outer_dst)?;
    let icmp_check = load::<u16>(ctx, e.icmp_off + 2)?;
    let mut delta = Delta::new();
    if family == FAMILY_V4 {
        let mut ip = load::<Ipv4Hdr>(ctx, e.inner_ip_off)?;
        let old = u16::from_ne_bytes(ip.check);
        let check = Delta::new()
            .words(&e.inner.src, &inner.src, 1)
            .words(&e.inner.dst, &inner.dst, 1)
            .apply(old);
        ip.check = check.to_ne_bytes();
        ip.src_addr = inner.src[0].to_ne_bytes();
        ip.dst_addr = inner.dst[0].to_ne_bytes();
        store(ctx, e.inner_ip_off, ip)?;
        delta = delta.half(old, check);
    } else {
        let addrs = bytes_mut::<32>(ctx, e.inner_ip_off + IPV6_SRC_OFF)?;
        put_addr(&mut addrs[..16], &inner.src);
        put_addr(&mut addrs[16..], &inner.dst);
        // ICMPv6's checksum covers the outer pseudo-header too.
        delta = delta
            .words(&e.outer.key.src, outer_src, 4)
            .words(&e.outer.key.dst, outer_dst, 4);
    }
    let icmp_check = delta
        .words(&e.inner.src, &inner.src, words)
        .words(&e.inner.dst, &inner.dst, words)
        .half(e.inner.sport, inner.sport)
        .half(e.inner.dport, inner.dport)
        .apply(icmp_check);
    store(ctx, e.inner_l4_off, [inner.sport, inner.dport])?;
    store(ctx, e.icmp_off + 2, icmp_check)
}

/// dnat: the backend's replies come from `reply_src:reply_sport` to the client's own
/// address and port. Claimed whatever was there: a stale entry for the same 4-tuple
/// can only be an older flow of this same client port.
#[inline(always)]
fn claim_reply(
    key: &FlowKey,
    reply_src: Addr,
    reply_sport: u16,
    cfg: &DatapathConfig,
    rev: &ReverseNat,
) {
    let rkey = FlowKey {
        src: reply_src,
        dst: key.src,
        sport: reply_sport,
        dport: key.sport,
        proto: key.proto,
        family: key.family,
        _pad: [0; 2],
    };
    // Busy (counted) only means another CPU held the bucket; the next packet retries.
    let _ = flows::insert((&rkey, flow_hash(&rkey, false)), rev, true, cfg);
}

/// Picks a free SNAT source port towards the backend (`reply_src`, `reply_sport`) and
/// claims it by inserting the reverse entry where there is none, so two flows can
/// never share a reply 5-tuple. Probes are hashed from the flow and bounded. Returns
/// the port in network order.
#[inline(always)]
fn alloc_port(
    key: &FlowKey,
    (reply_src, reply_sport): (Addr, u16),
    snat: Addr,
    cfg: &DatapathConfig,
    rev: &ReverseNat,
) -> Option<u16> {
    let min = cfg.snat_port_min as u32;
    let max = cfg.snat_port_max as u32;
    if max < min {
        return None;
    }
    // The client's own port first, where the range has it, as MASQUERADE does: a
    // backend that still holds the previous connection of this 4-tuple in TIME_WAIT
    // then sees the same client's next connection, whose sequence numbers follow on
    // and reopen it. A hashed port would reuse some other client's 4-tuple, whose
    // TIME_WAIT refuses the SYN (the connection then waits for a retransmission).
    let client_port = u16::from_be(key.sport) as u32;
    let mut probe = PortProbe {
        reply_src,
        snat,
        reply_sport,
        proto: key.proto,
        family: key.family,
        min,
        range: max - min + 1,
        hash: flow_hash(key, false),
        first: if client_port >= min && client_port <= max {
            client_port
        } else {
            NO_PORT
        },
        result: 0,
    };
    // A loop of the kernel's (bpf_loop), not ours: the verifier walked an inline
    // probe loop once per probe, 300,000 of its million instructions.
    mem::repeat(PORT_PROBES, probe_port, &mut probe);
    if probe.result & PROBE_FOUND == 0 {
        return None;
    }
    let port = probe.result as u16;
    let reclaimed = probe.result & PROBE_RECLAIM != 0;
    let rkey = reply_key(&probe, port);
    // Claimed here, not in the probe: an insert's frame on top of the loop's was more
    // stack than BPF allows. A flow of another CPU may have taken the port since: then
    // it is Exists, and this flow gets no port (counted as a drop; its next packet
    // retries).
    match flows::insert((&rkey, flow_hash(&rkey, false)), rev, reclaimed, cfg) {
        Insert::Written => {
            if reclaimed {
                stats::count(StatIndex::EventPortReclaimed, 0);
            }
            Some(port)
        }
        Insert::Exists | Insert::Busy => None,
    }
}

/// The reply 5-tuple of a flow given `port` (network order) as its SNAT source port.
#[inline(always)]
fn reply_key(p: &PortProbe, port: u16) -> FlowKey {
    FlowKey {
        src: p.reply_src,
        dst: p.snat,
        sport: p.reply_sport,
        dport: port,
        proto: p.proto,
        family: p.family,
        _pad: [0; 2],
    }
}

/// What the port probes share, on the allocating frame's stack.
struct PortProbe {
    reply_src: Addr,
    snat: Addr,
    reply_sport: u16,
    proto: u8,
    family: u8,
    min: u32,
    range: u32,
    /// The flow's hash, which spreads the probes.
    hash: u32,
    /// The client's own port (host order), tried first, or NO_PORT.
    first: u32,
    /// The port found (network order) | PROBE_FOUND (| PROBE_RECLAIM), or 0.
    result: u32,
}

const NO_PORT: u32 = u32::MAX;
const PROBE_FOUND: u32 = 1 << 16;
/// The port found is this flow's own already (its reply entry outlived its conntrack
/// entry): the insert takes it back.
const PROBE_RECLAIM: u32 = 1 << 17;

crate::loop_body!(probe_port, PortProbe, probe_one_port);

/// Probe `i`: looks at one port. Returns true (stop) once it found one free, or this
/// flow's own.
#[inline(always)]
fn probe_one_port(i: u32, p: &mut PortProbe) -> bool {
    // The loop's body is a function of its own: it reads the settings and the reverse
    // entry (written by reply_entry, in this CPU's scratch) where the caller does.
    let (Some(cfg), Some(scratch)) = (CONFIG.get(0), mem::this_cpu(&SCRATCH, 0)) else {
        return true;
    };
    let port = if i == 0 && p.first != NO_PORT {
        p.first as u16
    } else if p.range == 0 {
        return true;
    } else {
        (p.min + p.hash.wrapping_add(i.wrapping_mul(0x9e37_79b1)) % p.range) as u16
    };
    let rkey = reply_key(p, port.to_be());
    // Probed by looking: the claim (an insert, under the bucket's lock) follows.
    match flows::find::<ReverseNat>(&rkey, flow_hash(&rkey, false), cfg) {
        None => p.result = PROBE_FOUND | port.to_be() as u32,
        // The port may still be this very flow's, from before its conntrack entry
        // was evicted or expired: take it back, so the backend sees the same
        // source port and an established connection survives.
        Some(old) if same_client(old, &scratch.rev) => {
            p.result = PROBE_FOUND | PROBE_RECLAIM | port.to_be() as u32
        }
        Some(_) => return false,
    }
    true
}

/// Whether a reply entry is for the same client flow as `rev`.
#[inline(always)]
fn same_client(old: &ReverseNat, rev: &ReverseNat) -> bool {
    old.client == rev.client
        && old.client_port == rev.client_port
        && old.vip == rev.vip
        && old.vip_port == rev.vip_port
}
