//! Per-CPU counters (the BPF target has no atomic fetch_add; per-CPU needs none).

use lb_common::{packet_index, StatIndex};

use crate::{
    maps::{BACKEND_STATS, GLOBAL_STATS, SCRATCH, SERVICE_STATS},
    mem::this_cpu,
};

/// What the parser saw the packet as (a `Seen*` index), kept in this CPU's scratch
/// memory for [`count_packet`] after the pipeline, rather than in a register: carried
/// through the pipeline to its return value, a constant on each of the parser's paths
/// would be one the verifier tells every later state apart by (the entry's branch on
/// the returned action makes all of it precise): over its 1,000,000 instructions, from
/// 560,876. What map memory holds, it does not track.
#[inline(always)]
pub fn note_seen(seen: StatIndex) {
    if let Some(scratch) = this_cpu(&SCRATCH, 0) {
        scratch.seen = seen as u32;
    }
}

/// A packet, once, after the pipeline: what the parser saw it as ([`note_seen`]) and
/// the reason it went on with, in the pair's own entry (lb_common::packet_index), which
/// userspace sums both ways.
#[inline(always)]
pub fn count_packet(reason: u32, bytes: u64) {
    let Some(scratch) = this_cpu(&SCRATCH, 0) else {
        return;
    };
    if let Some(c) = this_cpu(&GLOBAL_STATS, packet_index(scratch.seen, reason)) {
        c.packets += 1;
        c.bytes += bytes;
    }
}

/// An event (StatIndex::is_event), besides the packet's reason.
#[inline(always)]
pub fn count(idx: StatIndex, bytes: u64) {
    if let Some(c) = this_cpu(&GLOBAL_STATS, idx as u32) {
        c.packets += 1;
        c.bytes += bytes;
    }
}

/// Adds `n` packets (no bytes) to an event counter.
#[inline(always)]
pub fn count_n(idx: StatIndex, n: u64) {
    if let Some(c) = this_cpu(&GLOBAL_STATS, idx as u32) {
        c.packets += n;
    }
}

#[inline(always)]
pub fn count_flow(service_id: u32, backend_id: u32, bytes: u64, new_flow: bool) {
    let n = new_flow as u64;
    if let Some(s) = this_cpu(&SERVICE_STATS, service_id) {
        s.packets += 1;
        s.bytes += bytes;
        s.new_flows += n;
    }
    if let Some(b) = this_cpu(&BACKEND_STATS, backend_id) {
        b.packets += 1;
        b.bytes += bytes;
        b.new_flows += n;
    }
}

/// A packet refused by its service's source ranges (allow.rs), per service.
#[inline(always)]
pub fn count_denied(service_id: u32) {
    if let Some(s) = this_cpu(&SERVICE_STATS, service_id) {
        s.denied += 1;
    }
}
