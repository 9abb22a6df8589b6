//! Stage 2b: who may reach a service. A service with source ranges (`allow:`,
//! `loadBalancerSourceRanges`) admits only clients inside one of them; the rest are
//! dropped here, before any state is made. XDP runs before netfilter, so the filter
//! kube-proxy writes for the same field never sees these packets: this is the check.
//!
//! Services without ranges pay one bit test on a value already read (the service's
//! flags for a new flow, its backend's for an established one), never a lookup.

use aya_ebpf::bindings::xdp_action;
use lb_common::{Addr, StatIndex, FAMILY_V4, SOURCE_RANGE_HEADER_BITS};

use crate::{
    maps::{SCRATCH, SOURCE_RANGES},
    mem::{put_addr, this_cpu},
    packet::Verdict,
    stats,
};

/// Err: `src` is outside service `service_id`'s ranges, and the packet is dropped
/// (counted per service). `restricted`: the service has ranges, from a flag the
/// caller has read already (the service's, or an established flow's backend's).
#[inline(always)]
pub fn check(restricted: bool, service_id: u32, family: u8, src: &Addr) -> Result<(), Verdict> {
    if restricted && !admits(service_id, family, src) {
        stats::count_denied(service_id);
        return Err((xdp_action::XDP_DROP, StatIndex::DropSourceDenied));
    }
    Ok(())
}

/// Whether `src` (of `family`) lies in one of service `service_id`'s ranges. Ranges
/// match their own family only: an IPv4-mapped IPv6 source is an IPv6 address here.
/// The key is built in per-CPU scratch memory (the stack has no room for it).
#[inline(always)]
fn admits(service_id: u32, family: u8, src: &Addr) -> bool {
    let Some(scratch) = this_cpu(&SCRATCH, 0) else {
        return false;
    };
    let key = &mut scratch.allow;
    let bits = if family == FAMILY_V4 { 32 } else { 128 };
    key.prefix_len = SOURCE_RANGE_HEADER_BITS + bits;
    key.data.service_id_be = service_id.to_be();
    key.data.family = family;
    put_addr(&mut key.data.addr, src);
    SOURCE_RANGES.get(&*key).is_some()
}
