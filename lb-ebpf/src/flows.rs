//! xlb's flow table (layout and protocol: lb-common's flows.rs): find, insert with
//! eviction by state, remove. Used by conntrack (XLB_CONNTRACK, keyed by the client's
//! 5-tuple) and by nat (XLB_REVERSE_NAT, keyed by the reply's).
//!
//! Why a bucket lock for inserts and lock-free reads: a reader costs one header line
//! and the way it matches, and never waits; two CPUs that miss on one new flow (a
//! flow RSS spreads, or nat's replies, which arrive on another hash than their flow)
//! must not both insert it, which only the lock can order. Per-CPU tables would need
//! no lock, but a nat reply must find the entry its flow's CPU wrote.

use aya_ebpf::maps::Array;
use lb_common::{
    bucket_of, flow_tag, idle_timeout_s, next_word, rank, word_busy, word_tag, DatapathConfig,
    FlowBucket, FlowKey, StatIndex, CT_F_ESTABLISHED, CT_F_FIN_SEEN, CT_F_RST_SEEN, FLOW_WAYS,
    PROTO_TCP,
};

use crate::{
    maps::{CONNTRACK, REVERSE_NAT},
    mem::{self, cas, copy_once, read_once, shared_slot, write_once},
    stats,
};

/// Attempts at a bucket's insert lock before the insert gives up (EventFlowTableBusy).
/// A holder keeps it for one scan and one way's write.
const LOCK_TRIES: u32 = 16;

const NS_PER_S: u64 = 1_000_000_000;

/// What the table needs to know of a value: its table, its state and when it was
/// last seen.
pub trait FlowValue: Copy + 'static {
    fn table() -> &'static Array<FlowBucket<Self>>;
    fn buckets(cfg: &DatapathConfig) -> u32;
    fn flags(&self) -> u8;
    fn last_seen_ns(&self) -> u64;
}

impl FlowValue for lb_common::ConnValue {
    #[inline(always)]
    fn table() -> &'static Array<FlowBucket<Self>> {
        &CONNTRACK
    }
    #[inline(always)]
    fn buckets(cfg: &DatapathConfig) -> u32 {
        cfg.conntrack_buckets
    }
    #[inline(always)]
    fn flags(&self) -> u8 {
        self.flags
    }
    #[inline(always)]
    fn last_seen_ns(&self) -> u64 {
        self.last_seen_ns
    }
}

impl FlowValue for lb_common::ReverseNat {
    #[inline(always)]
    fn table() -> &'static Array<FlowBucket<Self>> {
        &REVERSE_NAT
    }
    #[inline(always)]
    fn buckets(cfg: &DatapathConfig) -> u32 {
        cfg.reverse_buckets
    }
    #[inline(always)]
    fn flags(&self) -> u8 {
        self.flags
    }
    #[inline(always)]
    fn last_seen_ns(&self) -> u64 {
        self.last_seen_ns
    }
}

/// The idle timeout of a flow in this state, in nanoseconds.
#[inline(always)]
pub fn timeout_ns(proto: u8, flags: u8, cfg: &DatapathConfig) -> u64 {
    idle_timeout_s(proto, flags, cfg) as u64 * NS_PER_S
}

/// How readily a live way is given up (lb_common::rank).
#[inline(always)]
fn rank_of<V: FlowValue>(key: &FlowKey, v: &V, now: u64, cfg: &DatapathConfig) -> u8 {
    let flags = v.flags();
    if now.saturating_sub(v.last_seen_ns()) > timeout_ns(key.proto, flags, cfg) {
        rank::EXPIRED
    } else if key.proto != PROTO_TCP {
        rank::ESTABLISHED
    } else if flags & (CT_F_FIN_SEEN | CT_F_RST_SEEN) != 0 {
        rank::CLOSING
    } else if flags & CT_F_ESTABLISHED == 0 {
        rank::HALF_OPEN
    } else {
        rank::ESTABLISHED
    }
}

/// Whether two keys are the same flow: every word compared, no early exit (fewer
/// branches for the verifier, and no memcmp on this target).
#[inline(always)]
fn same_flow(a: &FlowKey, b: &FlowKey) -> bool {
    let d = (a.src[0] ^ b.src[0])
        | (a.src[1] ^ b.src[1])
        | (a.src[2] ^ b.src[2])
        | (a.src[3] ^ b.src[3])
        | (a.dst[0] ^ b.dst[0])
        | (a.dst[1] ^ b.dst[1])
        | (a.dst[2] ^ b.dst[2])
        | (a.dst[3] ^ b.dst[3])
        | (a.sport ^ b.sport) as u32
        | (a.dport ^ b.dport) as u32
        | (a.proto ^ b.proto) as u32
        | (a.family ^ b.family) as u32;
    d == 0
}

/// The value of flow `key` (of flow hash `hash`), in place, if the table holds it.
/// In place as the kernel's maps gave it: other CPUs may write the same way, each
/// field whole; a way another insert takes meanwhile is the rare race the kernel's
/// LRU maps had too (they reuse elements at once).
#[inline(always)]
pub fn find<'run, V: FlowValue>(
    key: &FlowKey,
    hash: u32,
    cfg: &DatapathConfig,
) -> Option<&'run mut V> {
    let b = shared_slot(V::table(), bucket_of(hash, V::buckets(cfg)))?;
    let tag = flow_tag(hash);
    let mut i = 0;
    while i < FLOW_WAYS {
        let w = read_once(&b.words[i]);
        // The key is read after the word and the word again after the key: a way
        // rewritten in between (its version moved) is not taken.
        if word_tag(w) == tag
            && !word_busy(w)
            && same_flow(&b.ways[i].key, key)
            && read_once(&b.words[i]) == w
        {
            return Some(&mut b.ways[i].value);
        }
        i += 1;
    }
    None
}

/// What an insert did.
pub enum Insert {
    /// The flow's way now holds the value: the way it had, or one taken for it.
    Written,
    /// The flow was there and `overwrite` was false: its value is untouched.
    Exists,
    /// Another CPU held the bucket for as long as we waited (counted).
    Busy,
}

/// `insert_way`'s answer: the way (0..FLOW_WAYS), plus EXISTS if the flow was there
/// and kept; BUSY alone if nothing was written.
const EXISTS: u32 = 8;
const BUSY: u32 = 16;

/// Inserts flow `key` (of flow hash `hash`) with `value` into `V`'s table. If the
/// flow is there already, its value is replaced only if `overwrite`. A full bucket
/// gives up a way by state: an expired one, else a closing one, else a half-open one,
/// else the least recently seen established one (and among ways of one state, the
/// least recently seen), so a SYN flood cannot take an established flow's way while
/// its bucket holds a half-open one.
#[inline(always)]
pub fn insert<V: FlowValue>(
    (key, hash): (&FlowKey, u32),
    value: &V,
    overwrite: bool,
    cfg: &DatapathConfig,
) -> Insert {
    match insert_way(key, hash as u64 | (overwrite as u64) << 32, value, cfg) {
        BUSY => Insert::Busy,
        d if d & EXISTS != 0 => Insert::Exists,
        _ => Insert::Written,
    }
}

/// `insert`'s work, a function of its own: its scan and writes would otherwise take
/// their stack in every caller's frame (BPF has 512 bytes for the whole call chain),
/// and a BPF function takes five arguments at most (`hash_overwrite`: the hash in the
/// low 32 bits, overwrite in bit 32).
#[inline(never)]
fn insert_way<V: FlowValue>(
    key: &FlowKey,
    hash_overwrite: u64,
    value: &V,
    cfg: &DatapathConfig,
) -> u32 {
    let hash = hash_overwrite as u32;
    let overwrite = hash_overwrite >> 32 != 0;
    let Some(b) = shared_slot(V::table(), bucket_of(hash, V::buckets(cfg))) else {
        return BUSY;
    };
    let mut tries = 0;
    while !cas(&mut b.lock, 0, 1) {
        tries += 1;
        if tries >= LOCK_TRIES {
            stats::count(StatIndex::EventFlowTableBusy, 0);
            return BUSY;
        }
    }
    let tag = flow_tag(hash);
    // Only lock holders take a way for a new flow, so no other CPU adds this flow
    // while the scans run; removals and rewrites (which take no lock) only move a
    // way's word, and a way whose word moved is rechecked when it is written.
    // First the words alone (the bucket's first line): the flow's own way, else the
    // first empty one. Only a full bucket reads its ways' states to rank them: two
    // more cache lines a way, cold for a new flow.
    let mut victim = FLOW_WAYS;
    let mut found = false;
    let mut i = 0;
    while i < FLOW_WAYS {
        let w = read_once(&b.words[i]);
        if word_tag(w) == tag && same_flow(&b.ways[i].key, key) {
            victim = i;
            found = true;
            break;
        }
        if word_tag(w) == 0 && victim == FLOW_WAYS {
            victim = i;
        }
        i += 1;
    }
    let mut victim_rank = rank::EMPTY;
    if victim == FLOW_WAYS {
        let now = mem::now();
        victim = 0;
        victim_rank = u8::MAX;
        let mut victim_seen = u64::MAX;
        let mut i = 0;
        while i < FLOW_WAYS {
            let w = read_once(&b.words[i]);
            let way = &b.ways[i];
            // A way a removal emptied since the first scan ranks as empty.
            let (r, seen) = if word_tag(w) == 0 {
                (rank::EMPTY, 0)
            } else {
                (
                    rank_of(&way.key, &way.value, now, cfg),
                    way.value.last_seen_ns(),
                )
            };
            if r < victim_rank || (r == victim_rank && seen < victim_seen) {
                victim = i;
                victim_rank = r;
                victim_seen = seen;
            }
            i += 1;
        }
    }
    let victim = victim & (FLOW_WAYS - 1);
    if found && !overwrite {
        unlock(b);
        return victim as u32 | EXISTS;
    }
    if !found {
        match victim_rank {
            rank::CLOSING | rank::HALF_OPEN => stats::count(StatIndex::EventFlowEvicted, 0),
            rank::ESTABLISHED => stats::count(StatIndex::EventEstablishedEvicted, 0),
            _ => {}
        }
    }
    // The way's word goes odd (readers skip it) by compare-and-swap: a removal that
    // came first is seen, and the way read again once.
    let mut w = read_once(&b.words[victim]);
    if !cas(&mut b.words[victim], w, next_word(w, tag)) {
        w = read_once(&b.words[victim]);
        if word_busy(w) || !cas(&mut b.words[victim], w, next_word(w, tag)) {
            unlock(b);
            stats::count(StatIndex::EventFlowTableBusy, 0);
            return BUSY;
        }
    }
    let busy = next_word(w, tag);
    let way = &mut b.ways[victim];
    copy_once(&mut way.key, key);
    copy_once(&mut way.value, value);
    // Even again: the way is whole. Nothing else moves a word that is odd, so a plain
    // store does, and the unlock too: x86 makes stores visible in program order (the
    // way before its word, the word before the lock), and a compare-and-swap here would
    // wait for the way's cache lines, which a new flow's way rarely has (measured).
    write_once(&mut b.words[victim], next_word(busy, tag));
    unlock(b);
    victim as u32
}

#[inline(always)]
fn unlock<V>(b: &mut FlowBucket<V>) {
    write_once(&mut b.lock, 0);
}

/// Removes flow `key`, if the table holds it and no one rewrote its way meanwhile.
#[inline(always)]
pub fn remove<V: FlowValue>(key: &FlowKey, hash: u32, cfg: &DatapathConfig) {
    let Some(b) = shared_slot(V::table(), bucket_of(hash, V::buckets(cfg))) else {
        return;
    };
    let tag = flow_tag(hash);
    let mut i = 0;
    while i < FLOW_WAYS {
        let w = read_once(&b.words[i]);
        if word_tag(w) == tag && !word_busy(w) && same_flow(&b.ways[i].key, key) {
            // Tag 0, the version two on (even): a reader that matched before sees
            // the word move.
            cas(&mut b.words[i], w, lb_common::freed_word(w));
            return;
        }
        i += 1;
    }
}
