//! A service's traffic counters. The datapath counts a balanced packet on its backend
//! alone (XLB_BACKEND_STATS: one counter a packet, not two); a service's traffic is
//! its backends' plus that of the backends it had (XLB_SERVICE_RETIRED, the agent's).
//! When the agent clears a backend id, the id's counters move to its service's retired
//! traffic and are zeroed: the service's totals never go down, and an id given out
//! again starts from zero. A new service's id is zeroed too, whatever a removed
//! service left under it.

use std::{
    borrow::Borrow,
    collections::BTreeMap,
    sync::{Mutex, MutexGuard},
};

use anyhow::{Context, Result};
use aya::maps::{Array, MapData, PerCpuArray, PerCpuValues};
use lb_common::{Backend, TrafficStats, MAP_BACKEND_STATS, MAP_SERVICE_RETIRED, MAP_SERVICE_STATS};
use tracing::info;

use super::Dataplane;

/// Held while counters move (a backend's to its service's retired traffic) and while
/// a service's traffic is summed: a reading in the agent's process (its metrics) never
/// sees them halfway, in both places (counted twice) or, had the order been the other,
/// in neither (a total that went down, which Prometheus takes for a reset). `xlb
/// status`, another process, can read them halfway, at the instant of a removal.
static MOVING: Mutex<()> = Mutex::new(());

fn moving() -> MutexGuard<'static, ()> {
    MOVING.lock().unwrap_or_else(|e| e.into_inner())
}

/// Entry `idx` of a per-CPU counter map, summed over the CPUs.
pub fn summed<T: Borrow<MapData>>(
    map: &PerCpuArray<T, TrafficStats>,
    idx: u32,
) -> Result<TrafficStats> {
    Ok(map
        .get(&idx, 0)?
        .iter()
        .fold(TrafficStats::default(), |a, s| a.plus(*s)))
}

/// Each service's traffic, by id: its retired traffic plus its live backends'
/// counters. `denied` is not traffic: it stays in XLB_SERVICE_STATS.
pub fn service_traffic<T: Borrow<MapData>, U: Borrow<MapData>>(
    retired: &Array<T, TrafficStats>,
    backend_stats: &PerCpuArray<U, TrafficStats>,
    backends: &BTreeMap<u32, Backend>,
    service_ids: impl IntoIterator<Item = u32>,
) -> Result<BTreeMap<u32, TrafficStats>> {
    let _moving = moving();
    let mut out = BTreeMap::new();
    for id in service_ids {
        // An id past the map's end has retired nothing (a map made smaller than the
        // services map by an earlier version would otherwise fail every reading).
        let r = match retired.get(&id, 0) {
            Ok(r) => r,
            Err(aya::maps::MapError::OutOfBounds { .. }) => TrafficStats::default(),
            Err(e) => return Err(e.into()),
        };
        out.insert(id, r);
    }
    for (bid, b) in backends {
        if let Some(t) = out.get_mut(&b.service_id) {
            *t = t.plus(summed(backend_stats, *bid)?);
        }
    }
    Ok(out)
}

impl Dataplane {
    /// A per-CPU counter map, to read.
    fn counters(&self, name: &str) -> Result<PerCpuArray<&MapData, TrafficStats>> {
        let map = self
            .ebpf
            .map(name)
            .with_context(|| format!("map {name} missing"))?;
        Ok(PerCpuArray::try_from(map)?)
    }

    fn per_cpu(&mut self, name: &str) -> Result<PerCpuArray<&mut MapData, TrafficStats>> {
        let map = self
            .ebpf
            .map_mut(name)
            .with_context(|| format!("map {name} missing"))?;
        Ok(PerCpuArray::try_from(map)?)
    }

    fn retired_map(&mut self) -> Result<Array<&mut MapData, TrafficStats>> {
        let map = self
            .ebpf
            .map_mut(MAP_SERVICE_RETIRED)
            .with_context(|| format!("map {MAP_SERVICE_RETIRED} missing"))?;
        Ok(Array::try_from(map)?)
    }

    fn zero_per_cpu(&mut self, name: &str, idx: u32) -> Result<()> {
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
        let zeros = PerCpuValues::try_from(vec![TrafficStats::default(); cpus])?;
        self.per_cpu(name)?
            .set(idx, zeros, 0)
            .with_context(|| format!("zeroing {name}[{idx}]"))
    }

    /// Backend id `id`'s counters move to service `service_id`'s retired traffic (None:
    /// they are only zeroed). Added there before they are zeroed: an agent stopped
    /// between the two counts them twice, rather than not at all. A packet the
    /// datapath counts between the read and the zeroing is lost to the totals.
    pub(super) fn retire_backend_counters(
        &mut self,
        id: u32,
        service_id: Option<u32>,
    ) -> Result<()> {
        let _moving = moving();
        let counted = summed(&self.counters(MAP_BACKEND_STATS)?, id)?;
        if counted == TrafficStats::default() {
            return Ok(());
        }
        if let Some(service_id) = service_id {
            let mut retired = self.retired_map()?;
            let total = retired.get(&service_id, 0)?.plus(counted);
            retired.set(service_id, total, 0)?;
        }
        self.zero_per_cpu(MAP_BACKEND_STATS, id)
    }

    /// Service id `id` is given to a new service: it starts from zero.
    pub(super) fn reset_service_counters(&mut self, id: u32) -> Result<()> {
        self.retired_map()?.set(id, TrafficStats::default(), 0)?;
        self.zero_per_cpu(MAP_SERVICE_STATS, id)
    }

    /// Pins a datapath of an earlier version counted in: it counted every packet per
    /// service as well, so a service's XLB_SERVICE_STATS holds traffic, which this
    /// datapath never writes there. Each such service's retired traffic gains what it
    /// counted less what its live backends did, so its totals carry on, and its
    /// traffic there is zeroed (`denied` kept); the counters of backend ids no backend
    /// holds (cleared ones, which that datapath did not zero) are zeroed. Run at every
    /// load: a load stopped midway converts the rest at the next, and pins an earlier
    /// version counted in again (a downgrade) are converted again. Returns the
    /// services converted.
    pub(super) fn convert_service_counters(&mut self) -> Result<usize> {
        let services = self.pinned_services()?;
        let ids: Vec<u32> = services.iter().map(|(_, v)| v.id).collect();
        let mut counted = Vec::new();
        {
            let service_stats = self.counters(MAP_SERVICE_STATS)?;
            for id in &ids {
                let t = summed(&service_stats, *id)?;
                if (t.packets, t.bytes, t.new_flows) != (0, 0, 0) {
                    counted.push((*id, TrafficStats { denied: 0, ..t }));
                }
            }
        }
        if counted.is_empty() {
            return Ok(0);
        }
        let backends = super::live_backends(&self.backends_map()?)?;
        // What each converted service's live backends counted.
        let mut live: BTreeMap<u32, TrafficStats> = counted
            .iter()
            .map(|(id, _)| (*id, TrafficStats::default()))
            .collect();
        {
            let stats = self.counters(MAP_BACKEND_STATS)?;
            for (bid, b) in &backends {
                if let Some(t) = live.get_mut(&b.service_id) {
                    *t = t.plus(summed(&stats, *bid)?);
                }
            }
        }
        for (id, c) in &counted {
            let from_backends = live.get(id).copied().unwrap_or_default();
            {
                let _moving = moving();
                let mut retired = self.retired_map()?;
                let total = retired.get(id, 0)?.plus(c.less(from_backends));
                retired.set(*id, total, 0)?;
            }
            // Each CPU's `denied` kept (a refusal counted between the read and the
            // write is lost: at this conversion only).
            let mut stats = self.per_cpu(MAP_SERVICE_STATS)?;
            let per_cpu: Vec<TrafficStats> = stats
                .get(id, 0)?
                .iter()
                .map(|t| TrafficStats {
                    denied: t.denied,
                    ..TrafficStats::default()
                })
                .collect();
            stats.set(*id, PerCpuValues::try_from(per_cpu)?, 0)?;
        }
        let max_backends = self.max_backends;
        let mut stale = Vec::new();
        {
            let stats = self.counters(MAP_BACKEND_STATS)?;
            for id in (0..max_backends).filter(|id| !backends.contains_key(id)) {
                if summed(&stats, id)? != TrafficStats::default() {
                    stale.push(id);
                }
            }
        }
        for id in &stale {
            self.zero_per_cpu(MAP_BACKEND_STATS, *id)?;
        }
        info!(
            services = counted.len(),
            cleared_backend_ids = stale.len(),
            "service counters converted from an earlier version's: the datapath counts per backend, and a service's traffic is its backends'"
        );
        Ok(counted.len())
    }
}
