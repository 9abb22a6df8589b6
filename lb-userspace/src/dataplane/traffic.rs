//! A service's traffic counters. The datapath counts a balanced packet on its backend
//! alone (XLB_BACKEND_STATS: one counter a packet, not two); a service's traffic is
//! its backends' plus that of the backends it had (XLB_SERVICE_RETIRED, the agent's).
//! When the agent clears a backend id, the id's counters move to its service's retired
//! traffic and are zeroed: the service's totals never go down, and an id given out
//! again starts from zero. A new service's id is zeroed too, whatever a removed
//! service left under it.

use std::{borrow::Borrow, collections::BTreeMap};

use anyhow::{Context, Result};
use aya::maps::{Array, MapData, PerCpuArray, PerCpuValues};
use lb_common::{Backend, TrafficStats, MAP_BACKEND_STATS, MAP_SERVICE_RETIRED, MAP_SERVICE_STATS};
use tracing::info;

use super::Dataplane;

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
    let mut out = BTreeMap::new();
    for id in service_ids {
        out.insert(id, retired.get(&id, 0)?);
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

    /// Backend id `id` (of service `service_id`) was cleared: its counters move to the
    /// service's retired traffic. Added there before they are zeroed: an agent stopped
    /// between the two counts them twice, rather than not at all. A packet the
    /// datapath counts between the read and the zeroing is lost to the totals.
    pub(super) fn retire_backend_counters(&mut self, id: u32, service_id: u32) -> Result<()> {
        let counted = summed(&self.counters(MAP_BACKEND_STATS)?, id)?;
        if counted == TrafficStats::default() {
            return Ok(());
        }
        let mut retired = self.retired_map()?;
        let total = retired.get(&service_id, 0)?.plus(counted);
        retired.set(service_id, total, 0)?;
        self.zero_per_cpu(MAP_BACKEND_STATS, id)
    }

    /// Service id `id` is given to a new service: it starts from zero.
    pub(super) fn reset_service_counters(&mut self, id: u32) -> Result<()> {
        self.retired_map()?.set(id, TrafficStats::default(), 0)?;
        self.zero_per_cpu(MAP_SERVICE_STATS, id)
    }

    /// Pins made by a datapath that counted every packet per service as well (before
    /// XLB_SERVICE_RETIRED existed): each service's retired traffic becomes what it
    /// counted less what its live backends did, so its totals carry on; the counters
    /// of backend ids no backend holds (cleared ones, which the datapath then did not
    /// zero) are zeroed. Returns the services converted.
    pub(super) fn convert_service_counters(&mut self) -> Result<usize> {
        let services = self.pinned_services()?;
        let backends = super::live_backends(&self.backends_map()?)?;
        let ids = services.iter().map(|(_, v)| v.id);
        // The retired traffic is all zeros here: the map was just made.
        let retired_now = self
            .ebpf
            .map(MAP_SERVICE_RETIRED)
            .with_context(|| format!("map {MAP_SERVICE_RETIRED} missing"))?;
        let from_backends = service_traffic(
            &Array::<&MapData, TrafficStats>::try_from(retired_now)?,
            &self.counters(MAP_BACKEND_STATS)?,
            &backends,
            ids,
        )?;
        let mut retired = Vec::new();
        {
            let service_stats = self.counters(MAP_SERVICE_STATS)?;
            for (id, live) in from_backends {
                let counted = TrafficStats {
                    denied: 0,
                    ..summed(&service_stats, id)?
                };
                retired.push((id, counted.less(live)));
            }
        }
        let mut map = self.retired_map()?;
        for (id, t) in &retired {
            map.set(*id, *t, 0)?;
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
            services = retired.len(),
            cleared_backend_ids = stale.len(),
            "service counters converted: the datapath now counts per backend, and a service's traffic is its backends'"
        );
        Ok(retired.len())
    }
}
