//! Map names, limits, keys and values. The XDP program declares the maps with these
//! names; the agent opens them by the same names under the pin path.

/// Map names (also the file names under the pin directory).
pub const MAP_SERVICES: &str = "XLB_SERVICES";
pub const MAP_BACKENDS: &str = "XLB_BACKENDS";
pub const MAP_MAGLEV: &str = "XLB_MAGLEV";
pub const MAP_CONNTRACK: &str = "XLB_CONNTRACK";
pub const MAP_REVERSE_NAT: &str = "XLB_REVERSE_NAT";
pub const MAP_GLOBAL_STATS: &str = "XLB_GLOBAL_STATS";
pub const MAP_SERVICE_STATS: &str = "XLB_SERVICE_STATS";
pub const MAP_BACKEND_STATS: &str = "XLB_BACKEND_STATS";
/// Per service id, the traffic of the backends it no longer has (their counters are
/// moved here when the agent clears them): a service's traffic is this plus its
/// backends' XLB_BACKEND_STATS. Written by the agent only; absent in pins from before
/// the datapath stopped counting per service (the agent's load converts those).
pub const MAP_SERVICE_RETIRED: &str = "XLB_SERVICE_RETIRED";
pub const MAP_CONFIG: &str = "XLB_CONFIG";
pub const MAP_NEIGHBOUR_REQUESTS: &str = "XLB_NEIGH_REQ";
pub const MAP_XDP_IFACES: &str = "XLB_XDP_IFACES";
pub const MAP_SERVICE_NAMES: &str = "XLB_SERVICE_NAMES";
/// Operator switches the agent reads (CONTROL_*): written by `xlb drain`/`undrain`.
pub const MAP_CONTROL: &str = "XLB_CONTROL";
/// Index in XLB_CONTROL: non-zero while the node is drained (nothing announced).
pub const CONTROL_DRAINED: u32 = 0;
/// The VIPs the agent announces (VipKey → Announced), for `xlb status` and metrics.
pub const MAP_ANNOUNCED: &str = "XLB_ANNOUNCED";

/// XLB_L2_VIPS: the VIPs this node answers ARP and neighbour solicitations for, per
/// interface.
pub const MAP_L2_VIPS: &str = "XLB_L2_VIPS";

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct L2Key {
    pub addr: Addr,
    pub ifindex: u32,
    pub family: u32,
}

/// XLB_L2_VIPS value: the MAC address to answer with (the interface's).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct L2Value {
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}

/// XLB_VIPS: every VIP with a service that can take new flows (VipKey → VIP_F_*), for
/// what the datapath answers about the address itself: ICMP echo.
pub const MAP_VIPS: &str = "XLB_VIPS";
/// VIPs the map holds (BPF_F_NO_PREALLOC: only VIPs that exist take memory).
pub const VIPS_MAX: u32 = 65_536;
/// XLB_VIPS flag: ICMP echo requests to the VIP are answered (`icmp_echo: true`, the
/// default).
pub const VIP_F_ECHO: u32 = 1;

/// XLB_ANNOUNCED key (and XLB_VIPS').
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipKey {
    pub addr: Addr,
    pub family: u32,
}

/// XLB_ANNOUNCED value: how and since when (seconds since the epoch).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Announced {
    pub since_s: u64,
    /// The routing table the route is in.
    pub table: u32,
    pub _pad: u32,
}
/// dsr's outer destination per backend id, when it is not the backend itself (the node
/// that hosts it and DNATs to it after decapsulating); zero: the backend's address. A
/// map of its own, read only on dsr's path: the Backend copied onto every packet's
/// stack stays small.
pub const MAP_BACKEND_TUNNELS: &str = "XLB_BACKEND_TUNNELS";

/// A bitmap over every service's (VIP, port, protocol), one bit each at
/// [`crate::hash::vip_filter_bit`]: a packet whose bit is clear is for no service and
/// skips the hashed service lookup. An array, whose lookup the verifier inlines; bits
/// shared by two keys only send a packet on to the lookup.
pub const MAP_VIP_FILTER: &str = "XLB_VIP_FILTER";
/// 65,536 bits (8 KiB) in 32-bit words: at 10,000 services one packet in seven that
/// is not for a service still goes on to the lookup. (Words were 64-bit while the bit
/// was a murmur hash: the word size changing makes an upgraded agent replace the
/// pinned map rather than have the program it replaces read bits placed by another
/// hash; see dataplane::drop_incompatible_pins.)
pub const VIP_FILTER_WORDS: u32 = 2048;
/// The same bitmap for the stateless services (`conntrack: false`) alone: a packet
/// whose bit is set looks its service up before conntrack, and a stateless service's
/// packet then skips the conntrack lookup (a miss on a cold bucket, every packet).
/// A bit shared with another service only costs that service's packets a lookup.
pub const MAP_STATELESS_FILTER: &str = "XLB_STATELESS_FILTER";
/// A word of XLB_VIP_FILTER.
pub type VipFilterWord = u32;
/// Bits per word of XLB_VIP_FILTER.
pub const VIP_FILTER_WORD_BITS: u32 = VipFilterWord::BITS;

/// Longest service name kept for status and metrics (longer ones are cut at a
/// character boundary). A Kubernetes name, `namespace/name:port/proto@vip`, fits.
pub const SERVICE_NAME_MAX: usize = 192;

/// XLB_SERVICE_NAMES value: a service's name, NUL-padded UTF-8. Only the agent and
/// `xlb status` use it; it is pinned so that status works while no agent runs.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ServiceName {
    pub bytes: [u8; SERVICE_NAME_MAX],
}
/// Name of the XDP program in the object file.
pub const PROGRAM_NAME: &str = "xlb";

/// Limits. The maps are sized from these at load time.
pub const MAX_SERVICES: u32 = 256;
pub const MAX_BACKENDS: u32 = 16384;
/// Largest Maglev table the datapath can hold per service. Userspace accepts any
/// prime up to this; 16381 is the default.
pub const MAGLEV_MAX_TABLE_SIZE: usize = 65537;
/// Slots per MAGLEV entry. A table is stored as chunks, so a service takes memory in
/// proportion to its M: 1008 slots (4032 bytes) plus the kernel's per-element header
/// (56 bytes with the key) and allocator link (8) make exactly 4096 bytes. One value of
/// 65537 slots took a 512 KiB allocation whatever M was (262,148 bytes rounds up to the
/// next power-of-two page order).
pub const MAGLEV_CHUNK_SLOTS: usize = 1008;
/// Chunks of the largest table.
pub const MAGLEV_MAX_CHUNKS: u32 = MAGLEV_MAX_TABLE_SIZE.div_ceil(MAGLEV_CHUNK_SLOTS) as u32;

/// Chunks of a table of `table_size` slots.
pub const fn maglev_chunks(table_size: u32) -> u32 {
    table_size.div_ceil(MAGLEV_CHUNK_SLOTS as u32)
}
/// Flows each of XLB_CONNTRACK and XLB_REVERSE_NAT holds by default
/// (`--conntrack-max`): 144 MiB each (flows.rs: 576-byte buckets of four).
pub const CONNTRACK_MAX: u32 = 1_048_576;

/// XLB_FRAGMENTS: the datagrams whose first fragment was balanced, so that their later
/// fragments (which carry no ports) follow it. An LRU map of its own: a flood of
/// fragments can only evict fragment records, never flows.
pub const MAP_FRAGMENTS: &str = "XLB_FRAGMENTS";
/// Its default size (`--fragments-max`).
pub const FRAGMENTS_MAX: u32 = 16_384;
/// How long a record serves later fragments: the kernel's own reassembly timeout
/// (net.ipv4.ipfrag_time), after which the datagram is lost anyway.
pub const FRAGMENT_LIFETIME_S: u64 = 30;

/// XLB_FRAGMENTS key: one datagram, as its fragments all carry it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragmentKey {
    pub src: Addr,
    pub dst: Addr,
    /// IPv4's 16-bit or IPv6's 32-bit identification, as on the wire.
    pub id: u32,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// XLB_FRAGMENTS value: the first fragment's ports, network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragmentValue {
    pub sport: u16,
    pub dport: u16,
    pub _pad: u32,
    /// bpf_ktime_get_coarse_ns when the first fragment was seen.
    pub first_seen_ns: u64,
}

/// XLB_SOURCE_RANGES: an LPM trie of the clients each restricted service admits
/// (SVC_F_SOURCE_RANGES). The key's bits are the service id, the family, then the
/// address: a range of prefix length L is stored with prefix_len
/// SOURCE_RANGE_HEADER_BITS + L, so a lookup matches only the ranges of its own
/// service and family. IPv4 ranges fill the first 4 address bytes.
pub const MAP_SOURCE_RANGES: &str = "XLB_SOURCE_RANGES";
/// Ranges over all services (the trie allocates per entry: its size costs nothing).
pub const SOURCE_RANGES_MAX: u32 = 65_536;

/// XLB_SOURCE_RANGES key data (the trie's key is `prefix_len` then this).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRangeKey {
    /// Big-endian, so that the trie's bit order is the number's.
    pub service_id_be: u32,
    /// FAMILY_V4 or FAMILY_V6.
    pub family: u8,
    /// The address bytes as on the wire; IPv4 in the first 4.
    pub addr: [u8; 16],
    /// Past every prefix: never compared.
    pub _pad: [u8; 3],
}

/// Bits of SourceRangeKey before the address: the service id and the family.
pub const SOURCE_RANGE_HEADER_BITS: u32 = 40;

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// An IPv4 or IPv6 address as four network-order words; IPv4 uses word 0, the rest are 0.
pub type Addr = [u32; 4];

/// SERVICES key: what a client addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub vip: Addr,
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

/// How a service's packets reach the backend (ServiceValue.mode).
/// Source and destination rewritten; replies come back through the LB.
pub const MODE_NAT: u8 = 0;
/// Destination rewritten only: the backend sees the client's address; its replies must
/// pass the LB (or a host running xlb) to be translated back.
pub const MODE_DNAT: u8 = 1;
/// The packet unchanged inside IP-in-IP (IPv4) or IPv6-in-IPv6 to the backend, which
/// answers the client directly from the VIP.
pub const MODE_DSR: u8 = 2;

/// Hash flows on the client address only (sessionAffinity: ClientIP).
pub const SVC_F_CLIENT_AFFINITY: u8 = 1;
/// Only clients inside the service's ranges in XLB_SOURCE_RANGES may reach it
/// (`allow:`, `loadBalancerSourceRanges`). Unset: everyone, and no lookup is made.
pub const SVC_F_SOURCE_RANGES: u8 = 2;
/// `conntrack: false` (dsr and dnat only): new flows write no conntrack entry and
/// every packet is balanced by Maglev alone (dnat still writes its replies' entry).
pub const SVC_F_STATELESS: u8 = 4;

/// SERVICES value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    /// Index into SERVICE_STATS and key of MAGLEV.
    pub id: u32,
    /// Prime M of this service's Maglev table; 0 while the service has no backends.
    pub table_size: u32,
    /// Was the service's mode. The mode is kept once, on the service's backend entries
    /// (`BACKEND_F_SVC_*`), where the packet reads it; this byte is written 0 and keeps
    /// the layout of maps pinned by earlier versions.
    pub _reserved: u8,
    pub flags: u8,
    /// Which of the service's two table generations is live (0 or 1). A new table is
    /// written under the other one, then this value is replaced in one update: a
    /// packet reads one ServiceValue and so sees the old table or the new one, whole.
    pub generation: u8,
    pub _pad: u8,
}

/// MAGLEV key: one chunk of one generation of a service's table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct MaglevKey {
    pub service_id: u32,
    /// Slots `chunk * MAGLEV_CHUNK_SLOTS ..` of the table.
    pub chunk: u16,
    pub generation: u8,
    pub _pad: u8,
}

/// MAGLEV value: backend id per slot, for one chunk of a table.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct MaglevChunk {
    pub slots: [u32; MAGLEV_CHUNK_SLOTS],
}

/// Backend flag: failing its health check (out of the Maglev table; shown by status).
pub const BACKEND_F_UNHEALTHY: u8 = 1;
/// Backend flag: reached by dnat whatever the service's mode (a dsr service's
/// endpoint on this very host: encapsulating to itself would go nowhere).
pub const BACKEND_F_DNAT: u8 = 2;
/// Backend flags: its service's mode is dnat, or dsr (neither: nat). A copy of the
/// service's mode in each of its backends, so that an established flow, which finds
/// its backend through its conntrack entry, needs no service lookup.
pub const BACKEND_F_SVC_DNAT: u8 = 4;
pub const BACKEND_F_SVC_DSR: u8 = 8;
/// Backend flag: its service has source ranges (SVC_F_SOURCE_RANGES), so that an
/// established flow, which never reads the service, is checked against them too.
pub const BACKEND_F_SVC_SOURCE_RANGES: u8 = 16;

/// ServiceKey.family bit: the service serves packets that arrived encapsulated to this
/// host and were decapsulated (the node side of dsr across nodes), not the clients'.
pub const SVC_KEY_ENCAPSULATED: u8 = 0x80;

/// BACKENDS value, at the index of a backend id that stays stable while the backend
/// exists. An array, not a hash: the datapath's lookup is then an inlined index, not a
/// hashed call. A free slot is all zeros (`family` 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr: Addr,
    /// Network byte order.
    pub port: u16,
    pub family: u8,
    pub flags: u8,
    pub service_id: u32,
    /// The SNAT source address for flows to this backend: the address the host's
    /// routing would use to reach it (`snat: auto`), or the configured one. Zero: none
    /// known, and new flows are dropped (drop_no_snat_address).
    pub snat: Addr,
    /// The configured weight; 0 is draining (no new flows, established ones stay).
    /// For status and metrics only: the datapath reads weights through the Maglev table.
    pub weight: u32,
}

impl Backend {
    /// Whether the slot holds a backend (free slots are zeroed).
    #[inline(always)]
    pub fn exists(&self) -> bool {
        self.family != 0
    }

    /// How flows reach this backend: dnat if it is marked so (BACKEND_F_DNAT),
    /// otherwise its service's mode.
    #[inline(always)]
    pub fn mode(&self) -> u8 {
        if self.flags & (BACKEND_F_DNAT | BACKEND_F_SVC_DNAT) != 0 {
            MODE_DNAT
        } else if self.flags & BACKEND_F_SVC_DSR != 0 {
            MODE_DSR
        } else {
            MODE_NAT
        }
    }
}

/// A 5-tuple as it appears on the wire, used for conntrack keys and the flow hash.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: Addr,
    pub dst: Addr,
    /// Network byte order.
    pub sport: u16,
    /// Network byte order.
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// Conntrack state bits.
pub const CT_F_FIN_SEEN: u8 = 1;
pub const CT_F_RST_SEEN: u8 = 2;
/// The client sent an ACK without SYN: the handshake completed (or the flow was picked
/// up mid-stream). Without it a TCP entry is half-open and takes the short SYN timeout.
pub const CT_F_ESTABLISHED: u8 = 4;

/// A next hop bpf_fib_lookup resolved: the datapath caches it in each flow's entry
/// (and in a shared map), so an established flow's packets skip the FIB and any
/// further map lookup. `expires_ns == 0` means empty.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop {
    pub expires_ns: u64,
    pub ifindex: u32,
    /// The interface the lookup routed from: a packet that came in elsewhere asks again.
    pub ingress: u32,
    /// The longest IP packet the FIB accepted for this hop (its MTU check): longer
    /// ones go to the FIB again.
    pub max_len: u16,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    pub _pad: [u8; 2],
}

/// CONNTRACK value: what the forward path needs to repeat its decision.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnValue {
    pub backend_id: u32,
    /// Source port after SNAT, network byte order.
    pub nat_port: u16,
    pub flags: u8,
    pub _pad: u8,
    /// Source address after SNAT.
    pub nat_addr: Addr,
    /// bpf_ktime_get_coarse_ns (CLOCK_MONOTONIC_COARSE) of the last packet, for idle timeouts.
    pub last_seen_ns: u64,
    /// Where this flow's packets go next (to the backend).
    pub hop: NextHop,
}

/// REVERSE_NAT value, keyed by the reply's 5-tuple (backend → SNAT address:port).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReverseNat {
    pub client: Addr,
    pub vip: Addr,
    pub client_port: u16,
    pub vip_port: u16,
    pub service_id: u32,
    pub backend_id: u32,
    /// The flow's CT_F_* state as this side has seen it: what the table's eviction
    /// ranks a reply entry by.
    pub flags: u8,
    pub _pad: [u8; 3],
    pub last_seen_ns: u64,
    /// Where this flow's replies go next (to the client).
    pub hop: NextHop,
}

/// A request from the datapath to resolve a next hop it found without a link-layer
/// address (XLB_NEIGH_REQ ring buffer): the agent makes it a managed neighbour entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NeighbourRequest {
    pub addr: Addr,
    pub ifindex: u32,
    pub family: u8,
    pub _pad: [u8; 3],
}

/// XLB_CONFIG value (an array of one): settings the agent gives the datapath.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DatapathConfig {
    /// SNAT source address for IPv4 (0 = the egress interface's address is unknown: pass).
    pub snat_v4: Addr,
    pub snat_v6: Addr,
    /// SNAT source port range, host byte order, inclusive. Kept apart from
    /// ip_local_port_range so replies to the host's own sockets are never taken for NAT.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    pub tcp_idle_timeout_s: u32,
    pub udp_idle_timeout_s: u32,
    pub tcp_closing_timeout_s: u32,
    /// For TCP entries that never completed the handshake (CT_F_ESTABLISHED unset).
    pub tcp_syn_timeout_s: u32,
    /// Non-zero: IP-in-IP and IPv6-in-IPv6 packets addressed to this host are
    /// decapsulated and passed to the kernel (the backend side of dsr).
    pub decap: u32,
    /// The flood guard: new flows per second on one CPU above which dsr and dnat flows
    /// are forwarded by Maglev alone (no conntrack entry) and nat flows get no entry
    /// (dropped, counted). 0: off.
    pub new_flow_limit: u32,
    /// Non-zero when some flow may be dnat (a dnat service, or a dsr backend DNATed on
    /// this host): their replies are keyed by the client's own port, so every packet
    /// that is not for a VIP may be one. Otherwise only packets to a port in the SNAT
    /// range can be replies, and the rest skip the reverse lookup.
    pub dnat_in_use: u32,
    /// Non-zero once XLB_VIP_FILTER holds the bit of every service in XLB_SERVICES;
    /// until then every packet goes to the service lookup.
    pub vip_filter: u32,
    /// Buckets of XLB_CONNTRACK and XLB_REVERSE_NAT (powers of two; flows.rs), as the
    /// agent created or adopted them.
    pub conntrack_buckets: u32,
    pub reverse_buckets: u32,
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are #[repr(C)] with explicit padding fields and no pointers,
    // so every byte pattern is a valid value.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for MaglevKey {}
    unsafe impl aya::Pod for MaglevChunk {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for ConnValue {}
    unsafe impl aya::Pod for ReverseNat {}
    unsafe impl aya::Pod for NextHop {}
    unsafe impl aya::Pod for DatapathConfig {}
    unsafe impl aya::Pod for NeighbourRequest {}
    unsafe impl aya::Pod for NetdevLayout {}
    unsafe impl aya::Pod for ServiceName {}
    unsafe impl aya::Pod for VipKey {}
    unsafe impl aya::Pod for L2Key {}
    unsafe impl aya::Pod for L2Value {}
    unsafe impl aya::Pod for Announced {}
    unsafe impl aya::Pod for FragmentKey {}
    unsafe impl aya::Pod for FragmentValue {}
    unsafe impl aya::Pod for SourceRangeKey {}
}

/// Where the redirect-failure tracepoints find a device's ifindex and network
/// namespace in the kernel's struct net_device (byte offsets from its BTF; see the
/// eBPF crate's redirect.rs). All zero until the agent writes them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetdevLayout {
    /// net_device.ifindex
    pub ifindex: u32,
    /// net_device.nd_net (a struct net pointer)
    pub nd_net: u32,
    /// net.ns.inum: the namespace's inode number, as in /proc/PID/ns/net
    pub net_inum: u32,
    pub _pad: u32,
}

/// XLB_REDIRECT_WATCH key: an interface by network namespace and ifindex (ifindexes
/// repeat across namespaces).
#[inline(always)]
pub fn watch_key(netns_inum: u32, ifindex: u32) -> u64 {
    ((netns_inum as u64) << 32) | ifindex as u64
}
