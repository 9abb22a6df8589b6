//! Per-CPU counters (the BPF target has no atomic fetch_add; per-CPU needs none).

use lb_common::StatIndex;

use crate::maps::{BACKEND_STATS, GLOBAL_STATS, SERVICE_STATS};

#[inline(always)]
pub fn count(idx: StatIndex, bytes: u64) {
    if let Some(c) = GLOBAL_STATS.get_ptr_mut(idx as u32) {
        // SAFETY: a per-CPU slot; nothing else runs on this CPU while we hold it.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

/// Adds `n` packets (no bytes) to an event counter.
#[inline(always)]
pub fn count_n(idx: StatIndex, n: u64) {
    if let Some(c) = GLOBAL_STATS.get_ptr_mut(idx as u32) {
        // SAFETY: per-CPU slot, as above.
        unsafe { (*c).packets += n };
    }
}

#[inline(always)]
pub fn count_flow(service_id: u32, backend_id: u32, bytes: u64, new_flow: bool) {
    let n = new_flow as u64;
    if let Some(s) = SERVICE_STATS.get_ptr_mut(service_id) {
        // SAFETY: per-CPU slot, as above.
        unsafe {
            (*s).packets += 1;
            (*s).bytes += bytes;
            (*s).new_flows += n;
        }
    }
    if let Some(b) = BACKEND_STATS.get_ptr_mut(backend_id) {
        // SAFETY: per-CPU slot, as above.
        unsafe {
            (*b).packets += 1;
            (*b).bytes += bytes;
            (*b).new_flows += n;
        }
    }
}

/// A packet refused by its service's source ranges (allow.rs), per service.
#[inline(always)]
pub fn count_denied(service_id: u32) {
    if let Some(s) = SERVICE_STATS.get_ptr_mut(service_id) {
        // SAFETY: per-CPU slot, as above.
        unsafe { (*s).denied += 1 };
    }
}
