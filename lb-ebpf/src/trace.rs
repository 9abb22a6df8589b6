//! One log line per packet through aya-log, for following a flow by hand.
//!
//! The agent sets `AYA_LOG_LEVEL` when it loads the program, from its own tracing
//! filter for `xlb::ebpf`. At the default (off) the level is a constant in the frozen
//! .rodata map, so the verifier removes all of this and the hot path pays nothing.
//!
//! Packets xlb handles are logged at debug, the rest (most traffic) at trace. The flow
//! is noted in per-CPU scratch before the pipeline and logged once after it: a log
//! call inside the pipeline would not fit the 512-byte stack. Two details the agent's
//! log bridge undoes: IPv4 is written IPv4-mapped (one format for both families), and
//! the reason is its counter index, since BPF cannot hold a table of string pointers.

use aya_log_ebpf::{
    log,
    macro_support::{level_enabled, Level},
};
use lb_common::{FlowKey, StatIndex, FAMILY_V4};

use crate::{
    maps::LOG_SCRATCH,
    mem::{put_addr, this_cpu},
};

/// Whether packets are logged (a constant: see above).
#[inline(always)]
pub fn enabled() -> bool {
    level_enabled(Level::Debug)
}

/// Notes the packet's flow for `packet`; `None` for a packet without one.
#[inline(always)]
pub fn note(key: Option<&FlowKey>) {
    if !enabled() {
        return;
    }
    let Some(flow) = this_cpu(&LOG_SCRATCH, 0) else {
        return;
    };
    let Some(k) = key else {
        flow.valid = 0;
        return;
    };
    // Written into the map byte by byte: a whole array built first would take stack
    // in every stage that notes a flow.
    if k.family == FAMILY_V4 {
        put_addr(&mut flow.src, &mapped_v4(k.src[0]));
        put_addr(&mut flow.dst, &mapped_v4(k.dst[0]));
    } else {
        put_addr(&mut flow.src, &k.src);
        put_addr(&mut flow.dst, &k.dst);
    }
    flow.sport = u16::from_be(k.sport);
    flow.dport = u16::from_be(k.dport);
    flow.proto = k.proto;
    flow.valid = 1;
}

/// Logs the noted flow with the verdict and its reason (the StatIndex's value).
#[inline(always)]
pub fn packet_raw(action: u32, reason: u32) {
    if enabled() {
        log_packet(action, reason);
    }
}

#[inline(never)]
fn log_packet(action: u32, reason: u32) {
    let Some(flow) = LOG_SCRATCH.get(0) else {
        return;
    };
    let level = if reason == StatIndex::PassNotVip as u32 || flow.valid == 0 {
        Level::Trace
    } else {
        Level::Debug
    };
    // Fields straight from the map value: copies of the addresses would take 32 of
    // this subprogram's stack, which adds to the pipeline's (512 bytes in all).
    log!(
        &(),
        level,
        "xdp [{:i}]:{} -> [{:i}]:{} proto={} action={} reason={}",
        flow.src,
        flow.sport,
        flow.dst,
        flow.dport,
        flow.proto,
        action,
        reason
    );
}

/// ::ffff:a.b.c.d, as words in network order.
#[inline(always)]
fn mapped_v4(a: u32) -> [u32; 4] {
    [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), a]
}
