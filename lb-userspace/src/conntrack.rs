//! Sweeping the flow tables (conntrack and reverse NAT), read through their mapping
//! (flows.rs): no syscall per entry.
//!
//! The datapath treats an expired entry as a miss and a full bucket gives up expired
//! and closing entries first, so correctness never depends on this sweep. It keeps the
//! tables honest: closed and idle flows, and flows of removed backends, leave the
//! tables (and the occupancy metric) within one interval instead of lingering.

use std::collections::BTreeMap;

use anyhow::Result;
pub use lb_common::reply_key;
use lb_common::{idle_timeout_s, Backend, DatapathConfig, FlowKey, ReverseNat};

use crate::{
    dataplane::Dataplane,
    flows::{Conntrack, Entry},
    model::Timeouts,
};

const NS_PER_S: u64 = 1_000_000_000;
/// A reverse entry is made just before its conntrack entry: one younger than this is
/// never taken for an orphan.
const REVERSE_GRACE_NS: u64 = 2 * NS_PER_S;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sweep {
    /// Conntrack entries past their idle or closing timeout.
    pub expired: usize,
    /// Entries whose backend is gone, and reply entries no flow refers to.
    pub orphaned: usize,
    /// Conntrack entries left.
    pub remaining: usize,
}

/// The datapath's clock (bpf_ktime_get_coarse_ns is CLOCK_MONOTONIC_COARSE).
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * NS_PER_S + ts.tv_nsec as u64
}

/// The timeout the datapath applies (lb_common::idle_timeout_s), for `t`.
pub fn timeout_ns(proto: u8, flags: u8, t: &Timeouts) -> u64 {
    let cfg = DatapathConfig {
        tcp_idle_timeout_s: t.tcp_idle,
        udp_idle_timeout_s: t.udp_idle,
        tcp_closing_timeout_s: t.tcp_closing,
        tcp_syn_timeout_s: t.tcp_syn,
        ..Default::default()
    };
    idle_timeout_s(proto, flags, &cfg) as u64 * NS_PER_S
}

pub fn sweep(dp: &mut Dataplane, t: &Timeouts) -> Result<Sweep> {
    let now = now_ns();
    let backends: BTreeMap<u32, Backend> = dp.backends()?;
    let ct = dp.conntrack()?;
    let rev = dp.reverse_nat()?;
    let mut out = Sweep::default();
    for e in ct.entries() {
        let gone = !backends.contains_key(&e.value.backend_id);
        let expired =
            now.saturating_sub(e.value.last_seen_ns) > timeout_ns(e.key.proto, e.value.flags, t);
        // A way rewritten since it was read is another flow's now: kept.
        if (gone || expired) && ct.remove(&e) {
            if gone {
                out.orphaned += 1;
            } else {
                out.expired += 1;
            }
        } else {
            out.remaining += 1;
        }
    }
    for e in rev.entries() {
        let old_enough = now.saturating_sub(e.value.last_seen_ns) > REVERSE_GRACE_NS;
        if old_enough && orphan(&e, &ct, &backends) && rev.remove(&e) {
            out.orphaned += 1;
        }
    }
    dp.swept()?;
    Ok(out)
}

/// Whether no live flow refers to this reply entry: its backend is gone, or the flow
/// it names has no conntrack entry that leads back to it.
fn orphan(e: &Entry<ReverseNat>, ct: &Conntrack, backends: &BTreeMap<u32, Backend>) -> bool {
    let Some(backend) = backends.get(&e.value.backend_id) else {
        return true;
    };
    let forward = FlowKey {
        src: e.value.client,
        dst: e.value.vip,
        sport: e.value.client_port,
        dport: e.value.vip_port,
        proto: e.key.proto,
        family: e.key.family,
        _pad: [0; 2],
    };
    match ct.get(&forward) {
        Some(f) => reply_key(&f.key, &f.value, backend) != e.key,
        None => true,
    }
}
