//! The flood guard: counts this CPU's new flows (conntrack misses) per one-second
//! window. Above the configured rate, the forward path stops making entries: dsr and
//! dnat flows are forwarded by Maglev alone, nat flows (which need an entry for their
//! SNAT port) are dropped. Established flows keep their entries, so a SYN flood from
//! random sources cannot push them out of the table. As Katran's max_conn_rate, per
//! CPU, so no two CPUs share a counter.

use aya_ebpf::bindings::xdp_action;
use lb_common::{DatapathConfig, StatIndex, MODE_NAT};

use crate::{maps::FLOOD, mem::this_cpu, packet::Verdict};

const NS_PER_S: u64 = 1_000_000_000;

/// Counts one new flow of a backend in `mode`. Ok(true): this CPU is above the limit
/// in this second, and the flow gets no entry; Err: nor could it do without one (nat).
#[inline(always)]
pub fn check(now: u64, cfg: &DatapathConfig, mode: u8) -> Result<bool, Verdict> {
    let flooded = over_limit(now, cfg);
    if flooded && mode == MODE_NAT {
        return Err((xdp_action::XDP_DROP, StatIndex::DropFloodNat));
    }
    Ok(flooded)
}

#[inline(always)]
fn over_limit(now: u64, cfg: &DatapathConfig) -> bool {
    let limit = cfg.new_flow_limit;
    if limit == 0 {
        return false;
    }
    let Some(w) = this_cpu(&FLOOD, 0) else {
        return false;
    };
    if now.wrapping_sub(w.start_ns) >= NS_PER_S {
        w.start_ns = now;
        w.new_flows = 0;
    }
    w.new_flows = w.new_flows.saturating_add(1);
    w.new_flows > limit
}
