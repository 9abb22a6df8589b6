//! What the stages hand each other: the parsed packet, an ICMP error with the packet
//! it quotes, the verdict, and the wire constants. Below the maps (maps.rs keeps an
//! `IcmpError` in scratch memory), so it imports nothing from the crate.

use lb_common::{FlowKey, StatIndex};

/// An XDP action and the counter that explains it.
pub type Verdict = (u32, StatIndex);

pub const ETH_LEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
/// Fixed headers: IPv4 without options, IPv6 without extension headers.
pub const IPV4_HDR_LEN: usize = 20;
pub const IPV6_HDR_LEN: usize = 40;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_IPV6: u8 = 41;
pub const IPPROTO_ICMPV6: u8 = 58;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Packet.frag: not a fragment (or IPv6's atomic fragment, which is whole).
pub const FRAG_NONE: u8 = 0;
/// Offset 0, more to come: it carries the transport header, and is balanced as any
/// packet is (fragments.rs records its ports for the rest).
pub const FRAG_FIRST: u8 = 1;
/// A non-zero offset: no transport header; its ports come from the first's record.
pub const FRAG_LATER: u8 = 2;
/// A later fragment whose offset reaches into the transport header (fragments.rs).
pub const FRAG_OVERLAP: u8 = 3;

/// A TCP or UDP packet we may balance (or an ICMP one, for the ICMP stages).
#[derive(Clone, Copy)]
pub struct Packet {
    /// The 5-tuple as it is on the wire (source = sender).
    pub key: FlowKey,
    /// Offset of the TCP/UDP header.
    pub l4_off: usize,
    /// TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
    /// TTL or hop limit.
    pub ttl: u8,
    /// Length of the IP packet (for the FIB's MTU check).
    pub ip_len: u16,
    /// FRAG_*: whether this is a fragment, and which kind. A fragment's datagram key
    /// (addresses, identification, protocol) is in per-CPU scratch memory, where the
    /// parser put it (fragments.rs reads it): unfragmented packets carry nothing more.
    pub frag: u8,
}

/// An ICMP error and the packet it quotes.
#[derive(Clone, Copy)]
pub struct IcmpError {
    /// Outer addresses; the outer ports are unused.
    pub outer: Packet,
    /// Offset of the ICMP header.
    pub icmp_off: usize,
    /// Offset of the quoted IP header, and of its transport header.
    pub inner_ip_off: usize,
    pub inner_l4_off: usize,
    /// The quoted packet's 5-tuple as it was sent.
    pub inner: FlowKey,
}
