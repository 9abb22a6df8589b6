//! The maps, declared once. Sizes and names come from lb-common, so the agent opens
//! exactly these. All are pinned by name, so a restarted agent finds them again.
//!
//! Below every stage: this file imports only packet.rs, and the value types the
//! program alone uses (scratch memory, the flood guard's window) are declared here.

use crate::packet::{IcmpError, Packet};
use aya_ebpf::{
    bindings::{bpf_fib_lookup, BPF_F_MMAPABLE},
    macros::map,
    maps::{lpm_trie::Key as LpmKey, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use lb_common::{
    buckets_for, Backend, ConnValue, ConntrackBucket, Counter, DatapathConfig, FlowKey,
    FragmentKey, FragmentValue, MaglevChunk, MaglevKey, NextHop, ReverseBucket, ReverseNat,
    ServiceKey, ServiceName, ServiceValue, SourceRangeKey, TrafficStats, VipFilterWord,
    CONNTRACK_MAX, FRAGMENTS_MAX, MAGLEV_MAX_CHUNKS, MAX_BACKENDS, MAX_SERVICES, SOURCE_RANGES_MAX,
    STAT_COUNT, VIPS_MAX, VIP_FILTER_WORDS,
};
use lb_common::{Addr, Announced, L2Key, L2Value, NetdevLayout, VipKey};

#[map(name = "XLB_SERVICES")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(MAX_SERVICES, 0);

#[map(name = "XLB_BACKENDS")]
pub static BACKENDS: Array<Backend> = Array::pinned(MAX_BACKENDS, 0);

/// Every service's table in 4 KiB chunks, two generations each at most (the live one
/// and, during an update, the next). BPF_F_NO_PREALLOC: only chunks that exist take
/// memory. The agent sizes it from --max-services at load.
#[map(name = "XLB_MAGLEV")]
pub static MAGLEV: HashMap<MaglevKey, MaglevChunk> =
    HashMap::pinned(MAX_SERVICES * 2 * MAGLEV_MAX_CHUNKS, 1);

/// The flow tables (flows.rs): buckets, sized by the agent from --conntrack-max and
/// mapped by it (BPF_F_MMAPABLE) to sweep and count without a syscall per entry.
#[map(name = "XLB_CONNTRACK")]
pub static CONNTRACK: Array<ConntrackBucket> =
    Array::pinned(buckets_for(CONNTRACK_MAX), BPF_F_MMAPABLE);

#[map(name = "XLB_REVERSE_NAT")]
pub static REVERSE_NAT: Array<ReverseBucket> =
    Array::pinned(buckets_for(CONNTRACK_MAX), BPF_F_MMAPABLE);

/// See lb_common::MAP_FRAGMENTS. Sized from --fragments-max at load.
#[map(name = "XLB_FRAGMENTS")]
pub static FRAGMENTS: LruHashMap<FragmentKey, FragmentValue> = LruHashMap::pinned(FRAGMENTS_MAX, 0);

/// See lb_common::MAP_STATELESS_FILTER (lookup.rs).
#[map(name = "XLB_STATELESS_FILTER")]
pub static STATELESS_FILTER: Array<VipFilterWord> = Array::pinned(VIP_FILTER_WORDS, 0);

/// See lb_common::MAP_VIPS (echo.rs).
#[map(name = "XLB_VIPS")]
pub static VIPS: HashMap<VipKey, u32> = HashMap::pinned(VIPS_MAX, 1);

/// See lb_common::MAP_SOURCE_RANGES (allow.rs).
#[map(name = "XLB_SOURCE_RANGES")]
pub static SOURCE_RANGES: LpmTrie<SourceRangeKey, u32> = LpmTrie::pinned(SOURCE_RANGES_MAX, 0);

/// The key type of SOURCE_RANGES.
pub type SourceRangeLpmKey = LpmKey<SourceRangeKey>;

/// Service names by id, for status and metrics; the program never reads it. Sized
/// from --max-services at load; BPF_F_NO_PREALLOC: only names that exist take memory.
#[map(name = "XLB_SERVICE_NAMES")]
pub static SERVICE_NAMES: HashMap<u32, ServiceName> = HashMap::pinned(MAX_SERVICES, 1);

/// See lb_common::MAP_BACKEND_TUNNELS. Sized from --max-backends at load.
#[map(name = "XLB_BACKEND_TUNNELS")]
pub static BACKEND_TUNNELS: Array<Addr> = Array::pinned(MAX_BACKENDS, 0);

/// Operator switches for the agent (`xlb drain`); the program never reads them.
#[map(name = "XLB_CONTROL")]
pub static CONTROL: Array<u32> = Array::pinned(4, 0);

/// What the agent announces, for `xlb status`; the program never reads it.
#[map(name = "XLB_ANNOUNCED")]
pub static ANNOUNCED: HashMap<VipKey, Announced> = HashMap::pinned(4096, 1);

/// The VIPs answered for at L2 (see l2.rs); written by the agent.
#[map(name = "XLB_L2_VIPS")]
pub static L2_VIPS: HashMap<L2Key, L2Value> = HashMap::pinned(4096, 0);

/// See lb_common::MAP_VIP_FILTER.
#[map(name = "XLB_VIP_FILTER")]
pub static VIP_FILTER: Array<VipFilterWord> = Array::pinned(VIP_FILTER_WORDS, 0);

#[map(name = "XLB_CONFIG")]
pub static CONFIG: Array<DatapathConfig> = Array::pinned(1, 0);

#[map(name = "XLB_GLOBAL_STATS")]
pub static GLOBAL_STATS: PerCpuArray<Counter> = PerCpuArray::pinned(STAT_COUNT, 0);

/// Per service, the packets its source ranges refused (`denied`); its traffic is its
/// backends' (BACKEND_STATS, stats::count_flow).
#[map(name = "XLB_SERVICE_STATS")]
pub static SERVICE_STATS: PerCpuArray<TrafficStats> = PerCpuArray::pinned(MAX_SERVICES, 0);

/// See lb_common::MAP_SERVICE_RETIRED: the agent's alone, never read here.
#[map(name = "XLB_SERVICE_RETIRED")]
pub static SERVICE_RETIRED: Array<TrafficStats> = Array::pinned(MAX_SERVICES, 0);

#[map(name = "XLB_BACKEND_STATS")]
pub static BACKEND_STATS: PerCpuArray<TrafficStats> = PerCpuArray::pinned(MAX_BACKENDS, 0);

/// Per-CPU scratch memory for the ICMP error path (not pinned: it holds no state
/// between packets). Its state does not fit the 512-byte stack next to the rest.
#[map(name = "XLB_ICMP_SCRATCH")]
pub static ICMP_SCRATCH: PerCpuArray<IcmpScratch> = PerCpuArray::with_max_entries(1, 0);

pub struct IcmpScratch {
    pub err: IcmpError,
    /// The quoted packet's reply 5-tuple: the REVERSE_NAT or CONNTRACK key.
    pub reply_key: FlowKey,
}

/// A packet that is not TCP or UDP, from the parser to the stages for it (main.rs).
pub struct OtherPacket {
    /// An ICMP packet's header fields (when `pass` is None).
    pub pkt: Packet,
    /// Not ICMP: passed for this reason, unless the L2 stage answers it.
    pub pass: Option<lb_common::StatIndex>,
}

pub struct NewFlow {
    pub pkt: Packet,
    pub svc: ServiceValue,
    /// The flow's hash (flow_hash(key, false)).
    pub hash: u32,
    /// The frame's length.
    pub len: u64,
    /// The packet's clock reading.
    pub now: u64,
}

/// Per-CPU scratch for what does not fit the 512-byte stack beside the rest of the
/// pipeline: a new flow's entries, built before they are inserted, and the FIB query
/// (not pinned: nothing in it outlives a packet).
#[map(name = "XLB_SCRATCH")]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

pub struct Scratch {
    /// A new flow, from the fast path or the pipeline that found it to the calls that
    /// balance and send it (main.rs).
    pub new: NewFlow,
    /// What is not TCP or UDP, from the parser to its stages (main.rs).
    pub other: OtherPacket,
    pub rev: ReverseNat,
    pub ct: ConnValue,
    pub fib: bpf_fib_lookup,
    /// The L2 answer's lookup key (l2.rs).
    pub l2: L2Key,
    /// A fragment's datagram (fragments.rs).
    pub frag: FragmentKey,
    /// A source-range lookup (allow.rs).
    pub allow: SourceRangeLpmKey,
    /// An echo request's VIP (echo.rs).
    pub vip: VipKey,
}

/// Per-CPU scratch for the debug log: the packet's flow, noted before the pipeline
/// runs and logged after it, so the one log call sits at the end and costs no stack
/// in the pipeline (not pinned; only written when eBPF logging is on).
#[map(name = "XLB_LOG_SCRATCH")]
pub static LOG_SCRATCH: PerCpuArray<LogFlow> = PerCpuArray::with_max_entries(1, 0);

pub struct LogFlow {
    /// IPv4 as IPv4-mapped IPv6, so one log format serves both families.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Host byte order.
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// 0 when the packet had no flow (not IP, or malformed).
    pub valid: u8,
}

/// The flood guard's per-CPU window (flood.rs). Not pinned: a rate, not state.
#[map(name = "XLB_FLOOD")]
pub static FLOOD: PerCpuArray<FloodWindow> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's new flows in the current window.
pub struct FloodWindow {
    pub start_ns: u64,
    pub new_flows: u32,
    pub _pad: u32,
}

/// Next hops bpf_fib_lookup resolved, shared by all flows to a destination; each flow
/// also keeps its own copy in its entry (see forward.rs). Not pinned: a cache, and a new agent starts it cold.
#[map(name = "XLB_NEXTHOP")]
pub static NEXTHOP: LruHashMap<NextHopKey, NextHop> = LruHashMap::with_max_entries(65536, 0);

#[repr(C)]
#[derive(Clone, Copy)]
pub struct NextHopKey {
    pub dst: Addr,
    /// The lookup routes from the ingress interface (it matters with VRFs and rules).
    pub ingress: u32,
    /// A whole word, so the key has no padding to zero (see mem::zero).
    pub family: u32,
}

/// Next hops the FIB knew no link-layer address for, for the agent to resolve (see
/// forward.rs). Not pinned: each agent reads the ring of the program it loaded.
#[map(name = "XLB_NEIGH_REQ")]
pub static NEIGHBOUR_REQUESTS: RingBuf = RingBuf::with_byte_size(16 * 1024, 0);

/// The interfaces this agent attached to, by `watch_key(netns inode, ifindex)`, for
/// the redirect-failure tracepoints (see redirect.rs). Not pinned: each agent fills
/// its own.
#[map(name = "XLB_REDIRECT_WATCH")]
pub static REDIRECT_WATCH: HashMap<u64, u8> = HashMap::with_max_entries(256, 0);

/// Where struct net_device keeps what the tracepoints need, from the kernel's BTF.
#[map(name = "XLB_NETDEV_LAYOUT")]
pub static NETDEV_LAYOUT: Array<NetdevLayout> = Array::with_max_entries(1, 0);
