//! The maps sink: performs the writes of the maps' plan (`plan.rs`), and keeps what
//! the maps hold so the next plan is made without reading them back.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use aya::maps::{Array, HashMap as BpfHashMap, MapData};
use lb_common::{
    Addr, Backend, DatapathConfig, MaglevChunk, MaglevKey, ServiceKey, ServiceName, ServiceValue,
    VipFilterWord, MAGLEV_CHUNK_SLOTS, MAGLEV_MAX_CHUNKS, MAP_BACKENDS, MAP_CONFIG, MAP_MAGLEV,
    MAP_SERVICES, MAP_SERVICE_NAMES,
};

use super::{
    plan::{self, Applied, ApplySummary, Limits, Write},
    Dataplane,
};
use crate::{
    codec,
    model::{Desired, Settings},
    source_ranges,
};

/// The maps sink.
impl crate::sink::Sink for Dataplane {
    type Changes = ApplySummary;

    async fn apply(&mut self, desired: &Desired) -> Result<Self::Changes> {
        Dataplane::apply(self, desired)
    }
}

/// What `Dataplane::restore_derived_state` rewrote.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Restored {
    pub filter_words: usize,
}

impl Dataplane {
    /// Rebuilds what is derived from the pinned services and backends, before the new
    /// program is attached: with Kubernetes as the source the first apply comes only
    /// after the attach. An upgrade may have replaced
    /// - the VIP filter (another layout or hash), which is then empty, and the program
    ///   would pass every packet for a VIP to the kernel: every service's bit is set
    ///   again (bits already set stay; a spare bit only costs a lookup);
    /// - nothing else today: a service's mode is kept once, on its backend entries,
    ///   where the packet reads it, and `dnat_in_use` is derived from those entries by
    ///   `codec::derived_dnat_in_use`, here as at every apply (`seed_config` when the
    ///   settings were replaced).
    ///
    /// A no-op once it is right.
    pub fn restore_derived_state(&mut self) -> Result<Restored> {
        let services = self.pinned_services()?;
        let mut restored = Restored::default();
        if services.is_empty() {
            return Ok(restored);
        }
        let wanted = codec::vip_filter(services.into_iter().map(|(k, _)| k));
        let map = self
            .ebpf
            .map_mut(lb_common::MAP_VIP_FILTER)
            .context("VIP filter map")?;
        let mut map = Array::<&mut MapData, VipFilterWord>::try_from(map)?;
        // Only the words that hold a service's bit: a read each, not one per word.
        for (i, want) in wanted.iter().enumerate().filter(|(_, w)| **w != 0) {
            let i = i as u32;
            let have = map.get(&i, 0)?;
            if have | want != have {
                map.set(i, have | want, 0)?;
                restored.filter_words += 1;
            }
        }
        Ok(restored)
    }

    /// Writes the datapath's settings from `base` (the config without the services yet
    /// to come) when the pinned settings are empty while services are pinned: the
    /// settings map was replaced by an upgrade. Zeroed settings would time every flow
    /// out and give new ones SNAT port 0 until the first apply, which with Kubernetes
    /// as the source comes after the program is attached. The settings that depend on
    /// the services (dnat in use, decapsulation) are read from the pinned services and
    /// backends. Returns whether it wrote.
    pub fn seed_config(&mut self, settings: &Settings) -> Result<bool> {
        let config_map: Array<&MapData, DatapathConfig> =
            Array::try_from(self.ebpf.map(MAP_CONFIG).context("config map")?)?;
        let running = config_map.get(&0, 0)?;
        if self.with_geometry(running) != self.with_geometry(DatapathConfig::default()) {
            return Ok(false);
        }
        let pinned = self.pinned_services()?;
        if pinned.is_empty() {
            return Ok(false);
        }
        let mut dp_cfg = codec::datapath_config(&Desired {
            settings: *settings,
            ..Default::default()
        });
        let backends = live_backends(&self.backends_map()?)?;
        dp_cfg.dnat_in_use = codec::derived_dnat_in_use(backends.values()) as u32;
        if pinned
            .iter()
            .any(|(k, _)| k.family & lb_common::SVC_KEY_ENCAPSULATED != 0)
        {
            dp_cfg.decap = 1;
        }
        let dp_cfg = self.with_geometry(dp_cfg);
        let mut config_map: Array<&mut MapData, DatapathConfig> =
            Array::try_from(self.ebpf.map_mut(MAP_CONFIG).context("config map")?)?;
        config_map.set(0, dp_cfg, 0)?;
        Ok(true)
    }

    /// The services in the pinned map, as the running program sees them.
    pub(super) fn pinned_services(&mut self) -> Result<Vec<(ServiceKey, ServiceValue)>> {
        self.hash_map::<ServiceKey, ServiceValue>(MAP_SERVICES)?
            .iter()
            .collect::<Result<_, _>>()
            .context("reading the pinned services")
    }

    pub(super) fn backends_map(&mut self) -> Result<Array<&mut MapData, Backend>> {
        let map = self
            .ebpf
            .map_mut(MAP_BACKENDS)
            .with_context(|| format!("map {MAP_BACKENDS} missing"))?;
        Ok(Array::try_from(map)?)
    }

    /// The backends by id: as the last apply wrote them, or read from the map.
    pub fn backends(&mut self) -> Result<BTreeMap<u32, Backend>> {
        match &self.applied {
            Some(a) => Ok(a.backends.clone()),
            None => live_backends(&self.backends_map()?),
        }
    }

    fn hash_map<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &str,
    ) -> Result<BpfHashMap<&mut MapData, K, V>> {
        let map = self
            .ebpf
            .map_mut(name)
            .with_context(|| format!("map {name} missing"))?;
        Ok(BpfHashMap::try_from(map)?)
    }

    /// Deletes the table generations that the last apply replaced.
    pub fn collect_retired(&mut self) -> Result<()> {
        for (id, generation, chunks) in std::mem::take(&mut self.retired) {
            self.delete_table(id, generation, chunks)?;
        }
        Ok(())
    }

    fn write_table(&mut self, id: u32, generation: u8, slots: &[u32]) -> Result<()> {
        let mut map = self.hash_map::<MaglevKey, MaglevChunk>(MAP_MAGLEV)?;
        for (chunk, part) in slots.chunks(MAGLEV_CHUNK_SLOTS).enumerate() {
            let mut value = MaglevChunk {
                slots: [0; MAGLEV_CHUNK_SLOTS],
            };
            value.slots[..part.len()].copy_from_slice(part);
            let key = MaglevKey {
                service_id: id,
                chunk: chunk as u16,
                generation,
                _pad: 0,
            };
            map.insert(key, value, 0)
                .with_context(|| format!("writing Maglev chunk {chunk} of service {id}"))?;
        }
        Ok(())
    }

    /// Removes a table generation's chunks; ones that are not there are fine.
    fn delete_table(&mut self, id: u32, generation: u8, chunks: u32) -> Result<()> {
        let mut map = self.hash_map::<MaglevKey, MaglevChunk>(MAP_MAGLEV)?;
        for chunk in 0..chunks {
            let key = MaglevKey {
                service_id: id,
                chunk: chunk as u16,
                generation,
                _pad: 0,
            };
            let _ = map.remove(&key);
        }
        Ok(())
    }

    /// Brings the maps to `desired`, changing only what differs (`plan`). Ids of
    /// services and backends that already exist (also ones adopted from pinned maps
    /// left by an earlier agent) are kept, so conntrack entries stay valid.
    pub fn apply(&mut self, desired: &Desired) -> Result<ApplySummary> {
        // Before anything is written: what the maps cannot hold changes nothing.
        desired.check_capacity(self.max_services, self.max_backends)?;
        self.collect_retired()?;
        // Taken, not borrowed: if a write fails midway, the next apply reads the maps
        // again.
        let now = match self.applied.take() {
            Some(a) => a,
            None => self.read_applied()?,
        };
        let limits = Limits {
            max_services: self.max_services,
            max_backends: self.max_backends,
        };
        // Ids cleared since the last sweep wait for it (`Applied::freed`): when only
        // they are left, nothing is written and the caller sweeps first.
        let free =
            (self.max_backends as usize).saturating_sub(now.backends.len() + now.freed.len());
        // Each service's digest, once: an unchanged service is known by it.
        let digests = plan::digests(desired);
        let needed = plan::backends_to_add_digested(&now, desired, &digests);
        if needed > free {
            let waiting = now.freed.len();
            self.applied = Some(now);
            anyhow::bail!("no free backend id: {needed} new backends, {free} ids free and {waiting} cleared ones waiting for a conntrack sweep");
        }
        // Each write is made as the plan gives it. On an error the maps may hold part
        // of the change: the next apply reads them back.
        let (applied, summary) =
            plan::plan_digested(now, desired, &digests, limits, &mut |w| self.write(w))?;
        self.applied = Some(applied);
        Ok(summary)
    }

    /// A conntrack sweep has deleted the flows of every backend id cleared before it:
    /// those ids can be given out again. What their reply entries counted on them since
    /// they were cleared moves to their services (if they still have one), so that the
    /// next backend given the id starts from zero.
    pub fn swept(&mut self) -> Result<()> {
        let Some(a) = self.applied.as_mut() else {
            return Ok(());
        };
        let freed = std::mem::take(&mut a.freed);
        let owners: Vec<(u32, Option<u32>)> = freed
            .iter()
            .map(|(id, (key, _))| (*id, a.services.get(key).map(|v| v.id)))
            .collect();
        for (id, service_id) in owners {
            self.retire_backend_counters(id, service_id)?;
        }
        Ok(())
    }

    /// Backend ids cleared and not yet swept.
    pub fn freed_backends(&self) -> usize {
        self.applied.as_ref().map_or(0, |a| a.freed.len())
    }

    /// What the maps hold, read back (adopted pins, or after a failed apply). Tables,
    /// names and tunnels are not read: the first apply rewrites them, alike.
    fn read_applied(&mut self) -> Result<Applied> {
        let trie = source_ranges::trie(&mut self.ebpf)?;
        let ranges = source_ranges::read(&trie)?;
        Ok(Applied {
            services: self.pinned_services()?.into_iter().collect(),
            backends: live_backends(&self.backends_map()?)?,
            ranges,
            vips: crate::vips::read(&mut self.ebpf)?,
            // Only before any write: after a failed apply the map may hold anything.
            tunnels_zeroed: std::mem::take(&mut self.tunnels_created),
            ..Default::default()
        })
    }

    /// Word `i` of one of the bitmap arrays (the VIP filter, the stateless filter).
    fn set_word(&mut self, map: &str, i: u32, word: VipFilterWord) -> Result<()> {
        let m = self
            .ebpf
            .map_mut(map)
            .with_context(|| format!("map {map}"))?;
        Array::<&mut MapData, VipFilterWord>::try_from(m)?.set(i, word, 0)?;
        Ok(())
    }

    fn write(&mut self, write: Write) -> Result<()> {
        match write {
            Write::FilterWord(i, word) => self.set_word(lb_common::MAP_VIP_FILTER, i, word)?,
            Write::StatelessWord(i, word) => {
                self.set_word(lb_common::MAP_STATELESS_FILTER, i, word)?
            }
            Write::Config(c) => {
                let c = self.with_geometry(c);
                let map = self.ebpf.map_mut(MAP_CONFIG).context("config map")?;
                Array::<&mut MapData, DatapathConfig>::try_from(map)?.set(0, c, 0)?;
            }
            Write::AddRanges(entries) => {
                source_ranges::add(&mut source_ranges::trie(&mut self.ebpf)?, &entries)?
            }
            Write::RemoveRanges(entries) => {
                source_ranges::remove(&mut source_ranges::trie(&mut self.ebpf)?, &entries)?
            }
            Write::Backend(id, b) => self
                .backends_map()?
                .set(id, b, 0)
                .with_context(|| format!("writing backend {id}"))?,
            Write::ClearBackend(id, service_id) => {
                // Its counters first: until the entry is cleared the id still counts in
                // its service's traffic, so no reading in between misses them.
                self.retire_backend_counters(id, service_id)?;
                self.backends_map()?.set(id, Backend::default(), 0)?;
            }
            Write::ResetServiceCounters(id) => self.reset_service_counters(id)?,
            Write::Tunnel(id, addr) => {
                let map = self
                    .ebpf
                    .map_mut(lb_common::MAP_BACKEND_TUNNELS)
                    .context("tunnel map")?;
                Array::<&mut MapData, Addr>::try_from(map)?.set(id, addr, 0)?;
            }
            Write::Table {
                id,
                generation,
                slots,
            } => self.write_table(id, generation, &slots)?,
            Write::Retire {
                id,
                generation,
                chunks,
            } => self.retired.push((id, generation, chunks)),
            Write::RemoveTables(id) => {
                for generation in [0, 1] {
                    self.delete_table(id, generation, MAGLEV_MAX_CHUNKS)?;
                }
            }
            Write::Name(id, name) => self
                .hash_map::<u32, ServiceName>(MAP_SERVICE_NAMES)?
                .insert(id, codec::service_name(&name), 0)?,
            Write::RemoveName(id) => {
                // Already gone is fine.
                let _ = self
                    .hash_map::<u32, ServiceName>(MAP_SERVICE_NAMES)?
                    .remove(&id);
            }
            Write::Service(key, value) => self
                .hash_map::<ServiceKey, ServiceValue>(MAP_SERVICES)?
                .insert(key, value, 0)?,
            Write::RemoveService(key) => self
                .hash_map::<ServiceKey, ServiceValue>(MAP_SERVICES)?
                .remove(&key)?,
            Write::Vip(k, flags) => crate::vips::set(&mut self.ebpf, k, flags)?,
            Write::RemoveVip(k) => crate::vips::remove(&mut self.ebpf, k)?,
        }
        Ok(())
    }
}

/// The backends in a BACKENDS array, by id (free slots are zeroed).
pub fn live_backends<T: std::borrow::Borrow<MapData>>(
    map: &Array<T, Backend>,
) -> Result<BTreeMap<u32, Backend>> {
    let mut out = BTreeMap::new();
    for (id, b) in map.iter().enumerate() {
        let b = b?;
        if b.exists() {
            out.insert(id as u32, b);
        }
    }
    Ok(out)
}
