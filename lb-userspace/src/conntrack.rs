//! Sweeping the conntrack and reverse-NAT maps.
//!
//! The datapath treats an expired entry as a miss, and the LRU reclaims entries under
//! pressure, so correctness never depends on this sweep. It keeps the tables honest:
//! closed and idle flows, and flows of removed backends, leave the maps (and the
//! occupancy metric) within one interval instead of lingering until evicted.

use std::collections::{BTreeMap, HashSet};

use anyhow::{Context, Result};
use aya::maps::{HashMap, MapData};
use lb_common::{
    Backend, ConnValue, FlowKey, ReverseNat, CT_F_FIN_SEEN, CT_F_RST_SEEN, MAP_CONNTRACK,
    MAP_REVERSE_NAT, PROTO_TCP,
};

use crate::{dataplane::Dataplane, model::Timeouts};

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
fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * NS_PER_S + ts.tv_nsec as u64
}

/// The same timeout the datapath applies (lb-ebpf/src/conntrack.rs).
fn timeout_ns(proto: u8, flags: u8, t: &Timeouts) -> u64 {
    let s = if proto != PROTO_TCP {
        t.udp_idle
    } else if flags & (CT_F_FIN_SEEN | CT_F_RST_SEEN) != 0 {
        t.tcp_closing
    } else if flags & lb_common::CT_F_ESTABLISHED == 0 {
        t.tcp_syn
    } else {
        t.tcp_idle
    };
    s as u64 * NS_PER_S
}

fn map<'a, K: aya::Pod, V: aya::Pod>(
    dp: &'a mut Dataplane,
    name: &str,
) -> Result<HashMap<&'a mut MapData, K, V>> {
    let m = dp
        .ebpf
        .map_mut(name)
        .with_context(|| format!("map {name} missing"))?;
    Ok(HashMap::try_from(m)?)
}

pub fn sweep(dp: &mut Dataplane, t: &Timeouts) -> Result<Sweep> {
    let now = now_ns();
    let backends: BTreeMap<u32, Backend> = dp.backends()?;
    let mut out = Sweep::default();

    let flows: Vec<(FlowKey, ConnValue)> = map::<FlowKey, ConnValue>(dp, MAP_CONNTRACK)?
        .iter()
        .filter_map(Result::ok)
        .collect();
    let mut live_replies: HashSet<FlowKey> = HashSet::new();
    let mut doomed: HashSet<FlowKey> = HashSet::new();
    for (key, ct) in &flows {
        let Some(b) = backends.get(&ct.backend_id) else {
            out.orphaned += 1;
            doomed.insert(*key);
            continue;
        };
        if now.saturating_sub(ct.last_seen_ns) > timeout_ns(key.proto, ct.flags, t) {
            out.expired += 1;
            doomed.insert(*key);
            continue;
        }
        live_replies.insert(FlowKey {
            src: b.addr,
            dst: ct.nat_addr,
            sport: b.port,
            dport: ct.nat_port,
            proto: key.proto,
            family: key.family,
            _pad: [0; 2],
        });
    }
    {
        let mut ct = map::<FlowKey, ConnValue>(dp, MAP_CONNTRACK)?;
        for key in &doomed {
            // Gone already (LRU, or the datapath re-created it) is fine.
            let _ = ct.remove(key);
        }
    }
    out.remaining = flows.len() - doomed.len();

    let replies: Vec<(FlowKey, ReverseNat)> = map::<FlowKey, ReverseNat>(dp, MAP_REVERSE_NAT)?
        .iter()
        .filter_map(Result::ok)
        .collect();
    let mut rev = map::<FlowKey, ReverseNat>(dp, MAP_REVERSE_NAT)?;
    for (key, r) in replies {
        let old_enough = now.saturating_sub(r.last_seen_ns) > REVERSE_GRACE_NS;
        let orphan = !backends.contains_key(&r.backend_id) || !live_replies.contains(&key);
        if orphan && old_enough {
            let _ = rev.remove(&key);
            out.orphaned += 1;
        }
    }
    dp.swept();
    Ok(out)
}
