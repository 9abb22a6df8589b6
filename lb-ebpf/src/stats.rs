//! Per-CPU counters (the BPF target has no atomic fetch_add; per-CPU needs none).

use lb_common::StatIndex;

use crate::{
    maps::{BACKEND_STATS, GLOBAL_STATS, SERVICE_STATS},
    mem::this_cpu,
};

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

/// A balanced packet, in either direction, on its backend's counters. Not on its
/// service's as well: the agent sums a service's traffic from its backends' counters
/// (and those of backends it had, XLB_SERVICE_RETIRED), which spares every packet a
/// second counter.
#[inline(always)]
pub fn count_flow(backend_id: u32, bytes: u64, new_flow: bool) {
    let n = new_flow as u64;
    if let Some(b) = this_cpu(&BACKEND_STATS, backend_id) {
        b.packets += 1;
        b.bytes += bytes;
        b.new_flows += n;
    }
}

/// A packet refused by its service's source ranges (allow.rs), per service: the only
/// counter the datapath keeps per service.
#[inline(always)]
pub fn count_denied(service_id: u32) {
    if let Some(s) = this_cpu(&SERVICE_STATS, service_id) {
        s.denied += 1;
    }
}
