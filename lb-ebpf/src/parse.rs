//! Stage 1: parse Ethernet, IPv4 (any IHL) or IPv6 (skipping extension headers), then
//! TCP or UDP. Anything else is classified with the reason it will be passed for.

use aya_ebpf::programs::XdpContext;
use lb_common::{FlowKey, FragmentKey, StatIndex, FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
};

use crate::{
    maps::SCRATCH,
    mem::{load, this_cpu},
    packet::{
        IcmpError, Packet, ETH_LEN, ETH_P_IP, ETH_P_IPV6, FRAG_FIRST, FRAG_LATER, FRAG_NONE,
        FRAG_OVERLAP, IPPROTO_ICMP, IPPROTO_ICMPV6, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
    },
};

const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;

const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AH: u8 = 51;
const IPV6_DSTOPTS: u8 = 60;
/// IPv4's fragment field: more fragments, and the offset in 8-byte units.
const IPV4_MORE_FRAGMENTS: u16 = 0x2000;
const IPV4_OFFSET_MASK: u16 = 0x1fff;
/// How many IPv6 extension headers we walk before giving up (a bounded loop).
const IPV6_MAX_EXT_HEADERS: usize = 4;

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
const ICMPV6_TIME_EXCEEDED: u8 = 3;
/// Where the source address starts in the IPv6 header (the destination follows).
const IPV6_SRC_OFF: usize = 8;
/// ICMP and ICMPv6 error headers are 8 bytes, then the packet that caused the error.
const ICMP_ERROR_HDR_LEN: usize = 8;

/// What the parser found besides a TCP or UDP packet (the balancer's): for the L2
/// and ICMP stages, or passed.
pub enum Other {
    /// An ICMP or ICMPv6 packet; `parse_icmp_error` looks inside it.
    Icmp(Packet),
    /// Anything else, with the reason it is passed for (an ARP frame: PassNotIp).
    Pass(StatIndex),
}

impl Other {
    /// The packet's flow (ICMP's addresses), for the debug log.
    #[inline(always)]
    pub fn key(&self) -> Option<&FlowKey> {
        match self {
            Other::Icmp(pkt) => Some(&pkt.key),
            Other::Pass(_) => None,
        }
    }
}

/// The parser's own result, split for the pipeline by `parse`.
enum Parsed {
    /// TCP or UDP. For a later fragment (FRAG_LATER, FRAG_OVERLAP), `key`'s ports are
    /// zero until fragments::follow fills them in.
    Flow(Packet),
    Icmp(Packet),
}

/// An IP packet's network layer, before the transport is examined.
struct Network {
    family: u8,
    proto: u8,
    src: [u32; 4],
    dst: [u32; 4],
    l4_off: usize,
    /// FRAG_NONE, FRAG_FIRST, FRAG_LATER or FRAG_OVERLAP.
    frag: u8,
    /// The datagram's identification (fragments only): IPv4's 16 bits, IPv6's 32, as
    /// on the wire.
    frag_id: u32,
    ttl: u8,
    ip_len: u16,
}

/// What the packet is (the `Seen*` counter), and a TCP or UDP packet to balance or
/// what else it is.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> (StatIndex, Result<Packet, Other>) {
    let (seen, parsed) = classify(ctx);
    let parsed = match parsed {
        Ok(Parsed::Flow(pkt)) => Ok(pkt),
        Ok(Parsed::Icmp(pkt)) => Err(Other::Icmp(pkt)),
        Err(reason) => Err(Other::Pass(reason)),
    };
    (seen, parsed)
}

/// The common packet alone, for the entry's fast path (balance::common): a whole IPv4
/// packet without options (`common_v4`) or IPv6 packet without extension headers
/// (`common_v6`), TCP or UDP, checked as `parse` checks it. None: anything else, which
/// `parse` then takes in full. One function per family, so that the fast path is
/// inlined once for each with its family a constant: one copy for both families cost
/// an IPv4 packet 6 ns (measured).
#[inline(always)]
pub fn common_v4(ctx: &XdpContext) -> Option<(StatIndex, Packet)> {
    whole(ctx, &parse_ipv4(ctx).ok()?, ETH_LEN + Ipv4Hdr::LEN)
}

#[inline(always)]
pub fn common_v6(ctx: &XdpContext) -> Option<(StatIndex, Packet)> {
    whole(ctx, &ipv6_alone(ctx)?, ETH_LEN + Ipv6Hdr::LEN)
}

/// The frame's EtherType (host order).
#[inline(always)]
pub fn ether_type(ctx: &XdpContext) -> Option<u16> {
    load::<u16>(ctx, 12).map(u16::from_be)
}

/// `net`'s TCP or UDP packet, if it is whole and its transport header is at `l4_off`.
#[inline(always)]
fn whole(ctx: &XdpContext, net: &Network, l4_off: usize) -> Option<(StatIndex, Packet)> {
    if net.l4_off != l4_off
        || net.frag != FRAG_NONE
        || ETH_LEN + net.ip_len as usize > frame_len(ctx)
    {
        return None;
    }
    match parse_transport(ctx, net) {
        Ok(Parsed::Flow(pkt)) => Some((seen_counter(net.family, net.proto), pkt)),
        _ => None,
    }
}

/// The error is the reason the packet is passed untouched.
#[inline(always)]
fn classify(ctx: &XdpContext) -> (StatIndex, Result<Parsed, StatIndex>) {
    let Some(eth) = load::<EthHdr>(ctx, 0) else {
        return (StatIndex::SeenNonIp, Err(StatIndex::PassParseError));
    };
    let net = match u16::from_be(eth.ether_type) {
        ETH_P_IP => parse_ipv4(ctx),
        ETH_P_IPV6 => parse_ipv6(ctx),
        ETH_P_8021Q | ETH_P_8021AD => {
            return (StatIndex::SeenNonIp, Err(StatIndex::PassVlan));
        }
        _ => return (StatIndex::SeenNonIp, Err(StatIndex::PassNotIp)),
    };
    let net = match net {
        Ok(n) => n,
        Err(family) => {
            let seen = if family == FAMILY_V4 {
                StatIndex::SeenIpv4Other
            } else {
                StatIndex::SeenIpv6Other
            };
            return (seen, Err(StatIndex::PassParseError));
        }
    };
    let seen = seen_counter(net.family, net.proto);
    // A packet longer than its frame was truncated on the way: the kernel would drop
    // it, and it must not create state here. (Shorter is fine: Ethernet pads.)
    if ETH_LEN + net.ip_len as usize > frame_len(ctx) {
        return (seen, Err(StatIndex::PassParseError));
    }
    if net.frag != FRAG_NONE {
        note_datagram(&net);
        if net.frag != FRAG_FIRST {
            return (seen, later_fragment(&net));
        }
    }
    (seen, parse_transport(ctx, &net))
}

#[inline(always)]
fn frame_len(ctx: &XdpContext) -> usize {
    ctx.data_end() - ctx.data()
}

#[inline(always)]
fn seen_counter(family: u8, proto: u8) -> StatIndex {
    match (family == FAMILY_V4, proto) {
        (true, PROTO_TCP) => StatIndex::SeenIpv4Tcp,
        (true, PROTO_UDP) => StatIndex::SeenIpv4Udp,
        (true, IPPROTO_ICMP) => StatIndex::SeenIpv4Icmp,
        (true, _) => StatIndex::SeenIpv4Other,
        (false, PROTO_TCP) => StatIndex::SeenIpv6Tcp,
        (false, PROTO_UDP) => StatIndex::SeenIpv6Udp,
        (false, IPPROTO_ICMPV6) => StatIndex::SeenIpv6Icmp,
        (false, _) => StatIndex::SeenIpv6Other,
    }
}

/// Err carries the family, for the `Seen*` counter of a malformed header.
#[inline(always)]
fn parse_ipv4(ctx: &XdpContext) -> Result<Network, u8> {
    // The fixed header as five words, a load each (mem::load).
    let [w0, w1, w2, src, dst] = load::<[u32; 5]>(ctx, ETH_LEN).ok_or(FAMILY_V4)?;
    let [vihl, _tos, len_hi, len_lo] = w0.to_ne_bytes();
    let [id0, id1, frags_hi, frags_lo] = w1.to_ne_bytes();
    let [ttl, proto, _, _] = w2.to_ne_bytes();
    let ihl = ((vihl & 0x0f) as usize) * 4;
    let tot_len = u16::from_be_bytes([len_hi, len_lo]);
    if vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN || (tot_len as usize) < ihl {
        return Err(FAMILY_V4);
    }
    let frags = u16::from_be_bytes([frags_hi, frags_lo]);
    // Most packets are whole: one test, and nothing else computed for them.
    let (frag, frag_id) = if frags & (IPV4_MORE_FRAGMENTS | IPV4_OFFSET_MASK) == 0 {
        (FRAG_NONE, 0)
    } else {
        let offset = ((frags & IPV4_OFFSET_MASK) as usize) * 8;
        let more = frags & IPV4_MORE_FRAGMENTS != 0;
        // The field's 16 bits where IPv6's 32 sit (the key compares them whole).
        (
            fragment_kind(offset, more, proto),
            u16::from_ne_bytes([id0, id1]) as u32,
        )
    };
    Ok(Network {
        family: FAMILY_V4,
        proto,
        src: [src, 0, 0, 0],
        dst: [dst, 0, 0, 0],
        l4_off: ETH_LEN + ihl,
        frag,
        frag_id,
        ttl,
        ip_len: tot_len,
    })
}

#[inline(always)]
fn parse_ipv6(ctx: &XdpContext) -> Result<Network, u8> {
    // The fixed header's first 8 bytes now, the addresses after the extension-header
    // walk: a copy of the whole header would stay live across the loop and spill
    // byte by byte onto the 512-byte stack.
    let [vcf, _, _, _, len_hi, len_lo, first_next, hop_limit] =
        load::<[u8; 8]>(ctx, ETH_LEN).ok_or(FAMILY_V6)?;
    let payload_len = u16::from_be_bytes([len_hi, len_lo]) as usize;
    if vcf >> 4 != 6 {
        return Err(FAMILY_V6);
    }
    let mut next = first_next;
    let mut off = ETH_LEN + Ipv6Hdr::LEN;
    let (mut frag, mut frag_id) = (FRAG_NONE, 0);
    for i in 0..IPV6_MAX_EXT_HEADERS {
        match next {
            // RFC 8200: Hop-by-Hop only right after the fixed header; elsewhere the
            // receiver discards the packet, so it gets no state here.
            IPV6_HOPOPTS if i > 0 => return Err(FAMILY_V6),
            IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS | IPV6_AH => {
                let ext = load::<[u8; 2]>(ctx, off).ok_or(FAMILY_V6)?;
                // AH counts its length in 4-byte units, the others in 8-byte units.
                let is_ah = next == IPV6_AH;
                next = ext[0];
                off += if is_ah {
                    (ext[1] as usize + 2) * 4
                } else {
                    (ext[1] as usize + 1) * 8
                };
            }
            // Next header, reserved, offset (13 bits) and M flag, identification.
            IPV6_FRAGMENT => {
                let [nh, _, off_hi, off_lo, i0, i1, i2, i3] =
                    load::<[u8; 8]>(ctx, off).ok_or(FAMILY_V6)?;
                let word = u16::from_be_bytes([off_hi, off_lo]);
                next = nh;
                off += 8;
                frag = fragment_kind(((word >> 3) as usize) * 8, word & 1 != 0, nh);
                frag_id = u32::from_ne_bytes([i0, i1, i2, i3]);
                // The transport header follows (a later fragment's data does). Headers
                // behind the fragment header are not walked: each walked header is
                // another path the verifier follows through the whole pipeline.
                break;
            }
            _ => break,
        }
    }
    ipv6_network(ctx, (next, off), (frag, frag_id), (hop_limit, payload_len)).ok_or(FAMILY_V6)
}

/// An IPv6 packet whose transport header, TCP or UDP, follows the fixed header (no
/// extension headers): `parse_ipv6` without the walk, for `common`.
#[inline(always)]
fn ipv6_alone(ctx: &XdpContext) -> Option<Network> {
    let [vcf, _, _, _, len_hi, len_lo, next, hop_limit] = load::<[u8; 8]>(ctx, ETH_LEN)?;
    if vcf >> 4 != 6 || (next != PROTO_TCP && next != PROTO_UDP) {
        return None;
    }
    let payload_len = u16::from_be_bytes([len_hi, len_lo]) as usize;
    let l4 = (next, ETH_LEN + Ipv6Hdr::LEN);
    ipv6_network(ctx, l4, (FRAG_NONE, 0), (hop_limit, payload_len))
}

/// The network layer of an IPv6 packet whose transport (protocol `next`) starts at
/// `l4_off`: the addresses are read last (see parse_ipv6).
#[inline(always)]
fn ipv6_network(
    ctx: &XdpContext,
    (next, l4_off): (u8, usize),
    (frag, frag_id): (u8, u32),
    (hop_limit, payload_len): (u8, usize),
) -> Option<Network> {
    let addrs = load::<[[u32; 4]; 2]>(ctx, ETH_LEN + IPV6_SRC_OFF)?;
    Some(Network {
        family: FAMILY_V6,
        proto: next,
        src: addrs[0],
        dst: addrs[1],
        l4_off,
        frag,
        frag_id,
        ttl: hop_limit,
        ip_len: (payload_len + Ipv6Hdr::LEN) as u16,
    })
}

#[inline(always)]
fn parse_transport(ctx: &XdpContext, net: &Network) -> Result<Parsed, StatIndex> {
    let mut key = portless_key(net);
    let ip_end = ETH_LEN + net.ip_len as usize;
    let tcp_flags = match net.proto {
        PROTO_TCP => {
            // Length checks after the load, on the copy: checked before it, LLVM merges
            // them with the load's own bounds check into a form the verifier refuses.
            // Ports, sequence and acknowledgement numbers, then data offset and flags:
            // four words, a load each (mem::load).
            let [ports, _, _, w3] =
                load::<[u32; 4]>(ctx, net.l4_off).ok_or(StatIndex::PassParseError)?;
            let [doff_byte, flags, _, _] = w3.to_ne_bytes();
            // A data offset under 5 words, or past the packet, is no TCP the backend
            // will take: pass it for the kernel to drop, with no state made.
            let doff = ((doff_byte >> 4) as usize) * 4;
            if doff < TcpHdr::LEN || net.l4_off + doff > ip_end {
                return Err(StatIndex::PassParseError);
            }
            let [s0, s1, d0, d1] = ports.to_ne_bytes();
            key.sport = u16::from_ne_bytes([s0, s1]);
            key.dport = u16::from_ne_bytes([d0, d1]);
            // From the copy: a second packet load here loses the verifier's range. The
            // flags are the wire's bits (packet.rs).
            flags & (TCP_FIN | TCP_SYN | TCP_RST | TCP_ACK)
        }
        PROTO_UDP => {
            // Ports, then length and checksum: two words.
            let [ports, len_check] =
                load::<[u32; 2]>(ctx, net.l4_off).ok_or(StatIndex::PassParseError)?;
            // As the kernel's UDP receive does: a length outside [8, the IP payload]
            // is a malformed datagram.
            // A first fragment's UDP length is the whole datagram's, past this packet.
            let [l0, l1, _, _] = len_check.to_ne_bytes();
            let udp_len = u16::from_be_bytes([l0, l1]) as usize;
            let whole = net.frag == FRAG_NONE;
            if udp_len < UdpHdr::LEN || (whole && net.l4_off + udp_len > ip_end) {
                return Err(StatIndex::PassParseError);
            }
            let [s0, s1, d0, d1] = ports.to_ne_bytes();
            key.sport = u16::from_ne_bytes([s0, s1]);
            key.dport = u16::from_ne_bytes([d0, d1]);
            0
        }
        // ICMP in fragments is never an error we translate (errors are small).
        IPPROTO_ICMP | IPPROTO_ICMPV6 if net.frag == FRAG_NONE => {
            return Ok(Parsed::Icmp(packet(net, key, 0)));
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => return Err(StatIndex::PassIcmpNotRelated),
        _ => return Err(StatIndex::PassUnsupportedProto),
    };
    Ok(Parsed::Flow(packet(net, key, tcp_flags)))
}

/// The packet's flow key before its ports are known.
#[inline(always)]
fn portless_key(net: &Network) -> FlowKey {
    FlowKey {
        src: net.src,
        dst: net.dst,
        sport: 0,
        dport: 0,
        proto: net.proto,
        family: net.family,
        _pad: [0; 2],
    }
}

#[inline(always)]
fn packet(net: &Network, key: FlowKey, tcp_flags: u8) -> Packet {
    Packet {
        key,
        l4_off: net.l4_off,
        tcp_flags,
        ttl: net.ttl,
        ip_len: net.ip_len,
        frag: net.frag,
    }
}

/// A later fragment of a TCP or UDP datagram, its ports left for fragments::follow.
#[inline(always)]
fn later_fragment(net: &Network) -> Result<Parsed, StatIndex> {
    if net.proto != PROTO_TCP && net.proto != PROTO_UDP {
        return Err(StatIndex::PassFragment);
    }
    Ok(Parsed::Flow(packet(net, portless_key(net), 0)))
}

/// A fragment's datagram key, into per-CPU scratch memory for fragments.rs: the
/// pipeline's stack has no room for it, and whole packets need none.
#[inline(always)]
fn note_datagram(net: &Network) {
    let Some(scratch) = this_cpu(&SCRATCH, 0) else {
        return;
    };
    scratch.frag = FragmentKey {
        src: net.src,
        dst: net.dst,
        id: net.frag_id,
        proto: net.proto,
        family: net.family,
        _pad: [0; 2],
    };
}

/// FRAG_* from a fragment's offset (bytes), its more-fragments flag and its protocol.
/// A later fragment whose data starts inside the TCP header it follows is marked:
/// with the first, it would let the receiver's reassembly rewrite the translated
/// ports (RFC 1858). (UDP's 8-byte header cannot be overlapped: offsets count in 8s.)
#[inline(always)]
fn fragment_kind(offset: usize, more: bool, proto: u8) -> u8 {
    if offset != 0 && proto == PROTO_TCP && offset < TcpHdr::LEN {
        FRAG_OVERLAP
    } else if offset != 0 {
        FRAG_LATER
    } else if more {
        FRAG_FIRST
    } else {
        FRAG_NONE
    }
}

/// Destination unreachable (with fragmentation needed), packet too big and time
/// exceeded, quoting a TCP or UDP packet of the same family. Other ICMP is not ours.
/// Writes into `out` (per-CPU scratch memory: this path's state does not fit the
/// 512-byte BPF stack next to everything else).
#[inline(always)]
pub fn parse_icmp_error(
    ctx: &XdpContext,
    outer: &Packet,
    out: &mut IcmpError,
) -> Result<(), StatIndex> {
    let family = outer.key.family;
    let icmp_off = outer.l4_off;
    // Type and code together: a 1-byte bounds check compiles to `p >= end`, a form the
    // verifier draws no range from.
    let [icmp_type, _code] = load::<[u8; 2]>(ctx, icmp_off).ok_or(StatIndex::PassParseError)?;
    let is_error = if family == FAMILY_V4 {
        outer.key.proto == IPPROTO_ICMP
            && (icmp_type == ICMP_DEST_UNREACH || icmp_type == ICMP_TIME_EXCEEDED)
    } else {
        outer.key.proto == IPPROTO_ICMPV6
            && (icmp_type == ICMPV6_DEST_UNREACH
                || icmp_type == ICMPV6_PACKET_TOO_BIG
                || icmp_type == ICMPV6_TIME_EXCEEDED)
    };
    if !is_error {
        return Err(StatIndex::PassIcmpNotRelated);
    }
    let inner_ip_off = icmp_off + ICMP_ERROR_HDR_LEN;
    out.outer = *outer;
    out.icmp_off = icmp_off;
    out.inner_ip_off = inner_ip_off;
    out.inner.family = family;
    out.inner._pad = [0; 2];
    if family == FAMILY_V4 {
        let ip = load::<Ipv4Hdr>(ctx, inner_ip_off).ok_or(StatIndex::PassIcmpNotRelated)?;
        let ihl = ((ip.vihl & 0x0f) as usize) * 4;
        if ihl < Ipv4Hdr::LEN {
            return Err(StatIndex::PassIcmpNotRelated);
        }
        out.inner.src = [u32::from_ne_bytes(ip.src_addr), 0, 0, 0];
        out.inner.dst = [u32::from_ne_bytes(ip.dst_addr), 0, 0, 0];
        out.inner.proto = ip.proto;
        out.inner_l4_off = inner_ip_off + ihl;
    } else {
        // Next header, then (after the hop limit) the two addresses.
        let next = load::<[u8; 2]>(ctx, inner_ip_off + 6).ok_or(StatIndex::PassIcmpNotRelated)?;
        out.inner.src =
            load::<[u32; 4]>(ctx, inner_ip_off + 8).ok_or(StatIndex::PassIcmpNotRelated)?;
        out.inner.dst =
            load::<[u32; 4]>(ctx, inner_ip_off + 24).ok_or(StatIndex::PassIcmpNotRelated)?;
        out.inner.proto = next[0];
        out.inner_l4_off = inner_ip_off + Ipv6Hdr::LEN;
    }
    if out.inner.proto != PROTO_TCP && out.inner.proto != PROTO_UDP {
        return Err(StatIndex::PassIcmpNotRelated);
    }
    // The quote must lie inside the outer packet, not in the frame's trailing bytes.
    if out.inner_l4_off + 4 > ETH_LEN + outer.ip_len as usize {
        return Err(StatIndex::PassIcmpNotRelated);
    }
    // Only the ports are needed (every ICMP error quotes at least 8 transport bytes).
    let ports = load::<[u16; 2]>(ctx, out.inner_l4_off).ok_or(StatIndex::PassIcmpNotRelated)?;
    out.inner.sport = ports[0];
    out.inner.dport = ports[1];
    Ok(())
}
