//! xlb's flow table: the layout of XLB_CONNTRACK and XLB_REVERSE_NAT, which the XDP
//! and TC programs write and the agent reads through a shared mapping.
//!
//! Each table is an array map (`BPF_F_MMAPABLE`) of buckets, a power of two of them.
//! A flow's bucket is the low bits of its flow hash (for the forward table, the hash
//! the Maglev pick uses); inside it, [`FLOW_WAYS`] ways, each a key and a value
//! compared in place. The bucket's first cache line holds one word per way (the
//! way's tag and version), so a miss reads that line alone.
//!
//! Concurrency (see docs/datapath.md, "The flow table"):
//! - Readers take no lock. A way's word is `tag << 32 | version`: the tag is the
//!   flow's hash with its low bit set (0 is an empty way), the version is even while
//!   the way is stable and odd while it is written. A reader that matched a key reads
//!   the word again, and takes the way only if it did not change.
//! - Inserts (the datapath only) hold the bucket's `lock`, taken by compare-and-swap,
//!   so two CPUs never insert one flow twice: the second finds the first's way.
//! - Removals (the datapath's cut, the agent's sweep) and rewrites of a way move its
//!   word by compare-and-swap, so a removal loses to a rewrite it raced with.

use crate::maps::{
    Backend, ConnValue, DatapathConfig, FlowKey, ReverseNat, CT_F_ESTABLISHED, CT_F_FIN_SEEN,
    CT_F_RST_SEEN, PROTO_TCP,
};

/// Ways per bucket. Four: a 64-byte header and four 128-byte ways, 576 bytes.
pub const FLOW_WAYS: usize = 4;

/// The version half of a way's word.
pub const WAY_VERSION_MASK: u64 = 0xffff_ffff;

/// What bucket 0's `format` word holds in a table whose flows are bucketed by this
/// version's [`crate::flow_hash`]. 0, in a table made before the word existed: the
/// earlier hash (ten murmur3 rounds), whose buckets the agent carries over into a new
/// table at start (dataplane/carry.rs) rather than adopt: this version would look
/// for those flows in other buckets.
pub const FLOW_TABLE_FORMAT: u64 = 2;

/// One flow: its key and value.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowWay<V> {
    pub key: FlowKey,
    pub value: V,
}

/// A bucket of the flow table: an array map's value.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowBucket<V> {
    /// 0: free; 1: an insert holds the bucket. 64 bits wide: the BPF target's
    /// compare-and-swap is 64-bit only at its default CPU version.
    pub lock: u64,
    /// Per way: `tag << 32 | version` (module comment).
    pub words: [u64; FLOW_WAYS],
    /// Bucket 0's only: [`FLOW_TABLE_FORMAT`] once the agent has stamped the table.
    /// The datapath never writes it.
    pub format: u64,
    pub _pad: [u64; 2],
    pub ways: [FlowWay<V>; FLOW_WAYS],
}

pub type ConntrackBucket = FlowBucket<ConnValue>;
pub type ReverseBucket = FlowBucket<ReverseNat>;

/// The tag a flow of hash `hash` has in its way's word: never 0 (an empty way).
#[inline(always)]
pub const fn flow_tag(hash: u32) -> u32 {
    hash | 1
}

/// The tag half of a way's word (0: empty).
#[inline(always)]
pub const fn word_tag(word: u64) -> u32 {
    (word >> 32) as u32
}

/// Whether a way's word says it is being written.
#[inline(always)]
pub const fn word_busy(word: u64) -> bool {
    word & 1 != 0
}

/// The word that follows `word` with tag `tag`: the version moves on by one.
#[inline(always)]
pub const fn next_word(word: u64, tag: u32) -> u64 {
    ((tag as u64) << 32) | ((word + 1) & WAY_VERSION_MASK)
}

/// The word of a way emptied from `word` (an even one): tag 0, the version two on.
#[inline(always)]
pub const fn freed_word(word: u64) -> u64 {
    (word + 2) & WAY_VERSION_MASK
}

/// Buckets for a table of `entries` flows: a power of two, at least one.
pub const fn buckets_for(entries: u32) -> u32 {
    let b = entries.div_ceil(FLOW_WAYS as u32);
    if b <= 1 {
        1
    } else {
        b.next_power_of_two()
    }
}

/// The bucket of a flow of hash `hash` in a table of `buckets` buckets (a power of two).
#[inline(always)]
pub const fn bucket_of(hash: u32, buckets: u32) -> u32 {
    hash & buckets.wrapping_sub(1)
}

/// The idle timeout, in seconds, of a flow in this state under the datapath's
/// settings: one function for the datapath's checks and the agent's sweep.
#[inline(always)]
pub const fn idle_timeout_s(proto: u8, flags: u8, cfg: &DatapathConfig) -> u32 {
    if proto != PROTO_TCP {
        cfg.udp_idle_timeout_s
    } else if flags & (CT_F_FIN_SEEN | CT_F_RST_SEEN) != 0 {
        cfg.tcp_closing_timeout_s
    } else if flags & CT_F_ESTABLISHED == 0 {
        cfg.tcp_syn_timeout_s
    } else {
        cfg.tcp_idle_timeout_s
    }
}

/// The reply 5-tuple of a conntrack entry: what nat's and dnat's reply entry for the
/// flow `key` to `backend` is keyed by (backend → the source it saw).
#[inline(always)]
pub const fn reply_key(key: &FlowKey, ct: &ConnValue, backend: &Backend) -> FlowKey {
    FlowKey {
        src: backend.addr,
        dst: ct.nat_addr,
        sport: backend.port,
        dport: ct.nat_port,
        proto: key.proto,
        family: key.family,
        _pad: [0; 2],
    }
}

/// How readily a way is given up when its bucket is full: the lowest goes first.
/// Among ways of one rank, the least recently seen.
pub mod rank {
    pub const EMPTY: u8 = 0;
    pub const EXPIRED: u8 = 1;
    /// TCP, FIN or RST seen.
    pub const CLOSING: u8 = 2;
    /// TCP, the handshake not (yet) completed: a SYN flood's entries.
    pub const HALF_OPEN: u8 = 3;
    /// TCP after its handshake, and every UDP flow.
    pub const ESTABLISHED: u8 = 4;
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: #[repr(C)] of Pod fields with explicit padding (the align(64) tail
    // padding of FlowWay is never read as a value).
    unsafe impl aya::Pod for FlowBucket<ConnValue> {}
    unsafe impl aya::Pod for FlowBucket<ReverseNat> {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_fits_cache_lines() {
        assert_eq!(core::mem::size_of::<FlowWay<ConnValue>>(), 128);
        assert_eq!(core::mem::size_of::<FlowWay<ReverseNat>>(), 128);
        assert_eq!(core::mem::size_of::<ConntrackBucket>(), 64 + 4 * 128);
        assert_eq!(core::mem::size_of::<ReverseBucket>(), 64 + 4 * 128);
        assert_eq!(core::mem::offset_of!(ConntrackBucket, ways), 64);
        // Where the tables before the format word had padding (zero).
        assert_eq!(core::mem::offset_of!(ConntrackBucket, format), 40);
    }

    #[test]
    fn words_and_buckets() {
        assert_eq!(flow_tag(0), 1);
        let w = next_word(0, 7);
        assert!(word_busy(w));
        assert_eq!(word_tag(w), 7);
        let w = next_word(w, 7);
        assert!(!word_busy(w));
        assert_eq!(next_word(0xffff_ffff, 3), 3 << 32);
        let freed = freed_word(w);
        assert_eq!(word_tag(freed), 0);
        assert!(!word_busy(freed));
        assert_ne!(freed, w & WAY_VERSION_MASK);
        assert_eq!(buckets_for(16), 4);
        assert_eq!(buckets_for(1_048_576), 262_144);
        assert_eq!(buckets_for(1_000_000), 262_144);
        assert_eq!(buckets_for(3), 1);
        assert_eq!(bucket_of(0xffff_ffff, 8), 7);
    }
}
