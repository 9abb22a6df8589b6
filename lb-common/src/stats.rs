//! Per-CPU counters. The XDP program adds to its own CPU's copy; userspace sums the copies.

/// One counter: packets and bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// Per backend: traffic plus new flows, both directions (the datapath's). Per service:
/// `denied` (the datapath's) and, in XLB_SERVICE_RETIRED, the agent's sum of the
/// traffic of backends the service had.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficStats {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    /// Per service: packets dropped because their source is outside its ranges
    /// (drop_source_denied). Unused per backend.
    pub denied: u64,
}

impl TrafficStats {
    /// Each counter added to `o`'s (wrapping, as the datapath's own additions).
    pub const fn plus(self, o: Self) -> Self {
        Self {
            packets: self.packets.wrapping_add(o.packets),
            bytes: self.bytes.wrapping_add(o.bytes),
            new_flows: self.new_flows.wrapping_add(o.new_flows),
            denied: self.denied.wrapping_add(o.denied),
        }
    }

    /// Each counter less `o`'s, at least 0.
    pub const fn less(self, o: Self) -> Self {
        Self {
            packets: self.packets.saturating_sub(o.packets),
            bytes: self.bytes.saturating_sub(o.bytes),
            new_flows: self.new_flows.saturating_sub(o.new_flows),
            denied: self.denied.saturating_sub(o.denied),
        }
    }
}

/// Index into GLOBAL_STATS. Every packet bumps exactly one of the `Seen*` protocol
/// counters and exactly one verdict reason, so the totals always add up.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatIndex {
    // What the parser saw.
    SeenIpv4Tcp = 0,
    SeenIpv4Udp,
    SeenIpv4Icmp,
    SeenIpv4Other,
    SeenIpv6Tcp,
    SeenIpv6Udp,
    SeenIpv6Icmp,
    SeenIpv6Other,
    SeenNonIp,
    // Why a packet was passed to the kernel untouched.
    PassNotIp,
    /// Neither for a service nor a reply: the host's own traffic, most of what a node
    /// sees. The datapath does not count it (a counter update is a tenth of such a
    /// packet's cost); userspace derives it ([`StatIndex::is_derived`]).
    PassNotVip,
    /// A later fragment (non-zero offset) of a datagram xlb holds no record of: not
    /// balanced, or its first fragment has not arrived (yet). The kernel gets it, as it
    /// gets the host's own fragments (docs/datapath.md, "Fragments").
    PassFragment,
    PassVlan,
    PassParseError,
    PassIcmpNotRelated,
    PassUnsupportedProto,
    // Forwarded or passed after translation.
    FwdForward,
    FwdReverse,
    PassNeighbourUnknown,
    PassNatReplyLocal,
    PassTtlExceeded,
    // Dropped.
    DropNoBackend,
    DropPortAlloc,
    DropFibFailure,
    DropNoSnatAddress,
    /// The next hop's link-layer address is not known yet and the rewritten packet
    /// comes from one of this host's own addresses, which the kernel would drop as a
    /// martian: dropped, and the agent asked to resolve the neighbour.
    DropNeighbourUnknown,
    /// Longer than the egress MTU allows: a nat or dnat packet after translation (the
    /// kernel would not fragment it either), or a dsr packet that could not be answered
    /// with ICMP too-big (IPv4 options).
    DropTooBig,
    /// dsr could not put the outer header in front (no headroom in the frame).
    DropEncapFailed,
    /// The flood guard was on (more new flows on this CPU in this second than
    /// `flood_guard.new_flows_per_cpu`) and a nat flow needed a new entry: none was
    /// made. Established flows are not affected; the client's retransmission retries.
    DropFloodNat,
    /// An IP-in-IP or IPv6-in-IPv6 packet to this host, decapsulated (`decap`) and
    /// passed to the kernel.
    PassDecapsulated,
    /// An ARP request or neighbour solicitation for a VIP announced on this interface,
    /// answered (XDP_TX).
    L2Answered,
    // ICMP errors translated.
    IcmpTranslated,
    /// A dsr packet too big for the path once encapsulated, answered with ICMP
    /// fragmentation-needed / packet-too-big carrying the MTU left for it.
    IcmpTooBigSent,
    /// A later fragment whose offset reaches into the transport header it follows
    /// (RFC 1858's tiny-fragment overlap): it could rewrite the ports after
    /// translation, so it is dropped.
    DropFragmentOverlap,
    /// dsr: an IPv4 fragment too big for the path once encapsulated. A fragment never
    /// carries DF, so there is no ICMP to answer with; IPv6 is answered with too-big.
    DropFragmentTooBig,
    /// The client's address is outside the service's allowed source ranges
    /// (`allow:`, `loadBalancerSourceRanges`): dropped before any state is made, and an
    /// established flow from it is cut.
    DropSourceDenied,
    /// An ICMP echo request to a VIP that can take new flows, answered from the VIP
    /// (XDP_TX).
    IcmpEchoAnswered,
    // Events, counted besides a packet's reason (not a reason themselves).
    /// A TCP packet without SYN started a flow: its conntrack entry had been evicted
    /// (table full) or had expired, or the flow began before xlb saw it.
    EventFlowRecreated,
    /// Re-creating a flow found the flow's own SNAT port still held by its reply
    /// entry, and took it back: the backend sees the same source port.
    EventPortReclaimed,
    /// A frame this program redirected (and counted as forwarded) that the kernel then
    /// failed to send: the target's queue was full or it cannot take XDP frames (native
    /// XDP on a veth whose peer has no NAPI). Counted from the kernel's xdp tracepoints
    /// while the agent runs; forwarded minus this is what was delivered.
    EventRedirectFailed,
    /// A dnat reply leaving this host (from a backend on it) translated by the TC
    /// egress program: not an XDP packet, so it has no reason of its own.
    EventEgressTranslated,
    /// The flood guard was on and a dsr or dnat flow was forwarded by Maglev alone,
    /// without a conntrack entry (its next packet is balanced again, to the same
    /// backend while the backends do not change).
    EventFloodStateless,
    /// A first fragment (offset 0, more to come) balanced: its ports were recorded in
    /// XLB_FRAGMENTS under (addresses, identification, protocol) for the rest.
    EventFragmentRecorded,
    /// A later fragment found its datagram's record and followed the first fragment's
    /// flow (its reason says where it went).
    EventFragmentFollowed,
    /// A new flow's entry could not be written: another CPU held its bucket for as
    /// long as the datapath waits. The packet went on by Maglev alone (nat: dropped,
    /// as its reply could not be found).
    EventFlowTableBusy,
    /// A new flow's entry took the way of a live flow that was closing or had not
    /// completed its handshake (its bucket was full).
    EventFlowEvicted,
    /// A new flow's entry took the way of an established flow: its bucket was full of
    /// established flows.
    EventEstablishedEvicted,
    /// Keep last: the number of counters.
    Count,
}

pub const STAT_COUNT: u32 = StatIndex::Count as u32;

impl StatIndex {
    pub const ALL: [StatIndex; STAT_COUNT as usize] = [
        StatIndex::SeenIpv4Tcp,
        StatIndex::SeenIpv4Udp,
        StatIndex::SeenIpv4Icmp,
        StatIndex::SeenIpv4Other,
        StatIndex::SeenIpv6Tcp,
        StatIndex::SeenIpv6Udp,
        StatIndex::SeenIpv6Icmp,
        StatIndex::SeenIpv6Other,
        StatIndex::SeenNonIp,
        StatIndex::PassNotIp,
        StatIndex::PassNotVip,
        StatIndex::PassFragment,
        StatIndex::PassVlan,
        StatIndex::PassParseError,
        StatIndex::PassIcmpNotRelated,
        StatIndex::PassUnsupportedProto,
        StatIndex::FwdForward,
        StatIndex::FwdReverse,
        StatIndex::PassNeighbourUnknown,
        StatIndex::PassNatReplyLocal,
        StatIndex::PassTtlExceeded,
        StatIndex::DropNoBackend,
        StatIndex::DropPortAlloc,
        StatIndex::DropFibFailure,
        StatIndex::DropNoSnatAddress,
        StatIndex::DropNeighbourUnknown,
        StatIndex::DropTooBig,
        StatIndex::DropEncapFailed,
        StatIndex::DropFloodNat,
        StatIndex::PassDecapsulated,
        StatIndex::L2Answered,
        StatIndex::IcmpTranslated,
        StatIndex::IcmpTooBigSent,
        StatIndex::DropFragmentOverlap,
        StatIndex::DropFragmentTooBig,
        StatIndex::DropSourceDenied,
        StatIndex::IcmpEchoAnswered,
        StatIndex::EventFlowRecreated,
        StatIndex::EventPortReclaimed,
        StatIndex::EventRedirectFailed,
        StatIndex::EventEgressTranslated,
        StatIndex::EventFloodStateless,
        StatIndex::EventFragmentRecorded,
        StatIndex::EventFragmentFollowed,
        StatIndex::EventFlowTableBusy,
        StatIndex::EventFlowEvicted,
        StatIndex::EventEstablishedEvicted,
    ];

    /// Parser classification: every packet counts one of these.
    pub const fn is_seen(self) -> bool {
        (self as u32) <= StatIndex::SeenNonIp as u32
    }

    /// Events are counted besides a packet's reason.
    pub const fn is_event(self) -> bool {
        (self as u32) >= StatIndex::EventFlowRecreated as u32
    }

    /// Why a packet was passed, dropped or sent: every packet counts exactly one.
    pub const fn is_reason(self) -> bool {
        !self.is_seen() && !self.is_event()
    }

    /// The one reason the datapath leaves uncounted (PassNotVip). Since every packet
    /// counts one `Seen*` and one reason, its packets and bytes are the `Seen*` totals
    /// less every other reason's; its own entry in XLB_GLOBAL_STATS is not read.
    pub const fn is_derived(self) -> bool {
        matches!(self, StatIndex::PassNotVip)
    }

    /// Stable snake_case name, used in `xlb status --json` and metric labels.
    pub const fn name(self) -> &'static str {
        match self {
            StatIndex::SeenIpv4Tcp => "seen_ipv4_tcp",
            StatIndex::SeenIpv4Udp => "seen_ipv4_udp",
            StatIndex::SeenIpv4Icmp => "seen_ipv4_icmp",
            StatIndex::SeenIpv4Other => "seen_ipv4_other",
            StatIndex::SeenIpv6Tcp => "seen_ipv6_tcp",
            StatIndex::SeenIpv6Udp => "seen_ipv6_udp",
            StatIndex::SeenIpv6Icmp => "seen_ipv6_icmp",
            StatIndex::SeenIpv6Other => "seen_ipv6_other",
            StatIndex::SeenNonIp => "seen_non_ip",
            StatIndex::PassNotIp => "pass_not_ip",
            StatIndex::PassNotVip => "pass_not_vip",
            StatIndex::PassFragment => "pass_fragment",
            StatIndex::PassVlan => "pass_vlan",
            StatIndex::PassParseError => "pass_parse_error",
            StatIndex::PassIcmpNotRelated => "pass_icmp_not_related",
            StatIndex::PassUnsupportedProto => "pass_unsupported_proto",
            StatIndex::FwdForward => "fwd_forward",
            StatIndex::FwdReverse => "fwd_reverse",
            StatIndex::PassNeighbourUnknown => "pass_neighbour_unknown",
            StatIndex::PassNatReplyLocal => "pass_nat_reply_local",
            StatIndex::PassTtlExceeded => "pass_ttl_exceeded",
            StatIndex::DropNoBackend => "drop_no_backend",
            StatIndex::DropPortAlloc => "drop_port_alloc",
            StatIndex::DropFibFailure => "drop_fib_failure",
            StatIndex::DropNoSnatAddress => "drop_no_snat_address",
            StatIndex::DropNeighbourUnknown => "drop_neighbour_unknown",
            StatIndex::DropTooBig => "drop_too_big",
            StatIndex::DropEncapFailed => "drop_encap_failed",
            StatIndex::DropFloodNat => "drop_flood_nat",
            StatIndex::PassDecapsulated => "pass_decapsulated",
            StatIndex::L2Answered => "l2_answered",
            StatIndex::IcmpTranslated => "icmp_translated",
            StatIndex::IcmpTooBigSent => "icmp_too_big_sent",
            StatIndex::DropFragmentOverlap => "drop_fragment_overlap",
            StatIndex::DropFragmentTooBig => "drop_fragment_too_big",
            StatIndex::DropSourceDenied => "drop_source_denied",
            StatIndex::IcmpEchoAnswered => "icmp_echo_answered",
            StatIndex::EventFlowRecreated => "event_flow_recreated",
            StatIndex::EventPortReclaimed => "event_port_reclaimed",
            StatIndex::EventRedirectFailed => "event_redirect_failed",
            StatIndex::EventEgressTranslated => "event_egress_translated",
            StatIndex::EventFloodStateless => "event_flood_stateless",
            StatIndex::EventFragmentRecorded => "event_fragment_recorded",
            StatIndex::EventFragmentFollowed => "event_fragment_followed",
            StatIndex::EventFlowTableBusy => "event_flow_table_busy",
            StatIndex::EventFlowEvicted => "event_flow_evicted",
            StatIndex::EventEstablishedEvicted => "event_established_evicted",
            StatIndex::Count => "count",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: plain #[repr(C)] integers.
    unsafe impl aya::Pod for Counter {}
    unsafe impl aya::Pod for TrafficStats {}
}
