//! The maps' plan, pure: from what the maps hold (as last applied) and the desired
//! state, the writes that bring them there, in an order the running datapath can read
//! at every step. No map is touched here (`maps.rs` performs the writes), so the plan
//! is tested without root.
//!
//! The order:
//! 1. the VIP filter gains the bits of new services (a superset of old and new);
//! 2. the settings;
//! 3. per service: its new source ranges, then its backends and their tunnels, then a
//!    new Maglev table generation written whole, then the service entry naming it;
//! 4. removed services, then their tables and names; then removed backends, once no
//!    table names them;
//! 5. source ranges no flag reads any more; the VIP entries; the exact VIP filter.
//!
//! A service whose model and table inputs are those last applied is skipped whole: a
//! one-backend change costs one service's work, not all of them.

use std::{
    collections::{BTreeMap, BTreeSet},
    hash::Hash,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::{Context, Result};
use lb_common::{
    maglev_chunks, Addr, Backend, DatapathConfig, ServiceKey, ServiceValue, VipFilterWord,
    BACKEND_F_SVC_SOURCE_RANGES, BACKEND_F_UNHEALTHY, MAGLEV_MAX_CHUNKS, SVC_F_CLIENT_AFFINITY,
    SVC_F_SOURCE_RANGES, SVC_F_STATELESS, VIP_F_ECHO,
};

use crate::{
    codec::{self, addr_to_words, backend_addr},
    maglev,
    model::{self, Desired, SessionAffinity},
    source_ranges,
};

/// A source range entry: (service id, range).
pub type RangeEntry = source_ranges::Entry;
/// A VIP entry: (family, address) → flags.
pub type VipEntries = BTreeMap<(u32, Addr), u32>;

/// What the maps hold, as the last apply left them (or as read back from adopted pins).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Applied {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub backends: BTreeMap<u32, Backend>,
    /// The Maglev table written per service id. Empty after a restart: the first
    /// apply rewrites every table, with identical contents, which is harmless.
    pub tables: BTreeMap<u32, WrittenTable>,
    /// Service names by id (empty after a restart, as above).
    pub names: BTreeMap<u32, String>,
    /// dsr tunnel destinations by backend id (empty after a restart: every one is
    /// written, zeros too), the non-zero ones only when `tunnels_zeroed`.
    pub tunnels: BTreeMap<u32, Addr>,
    /// An id missing from `tunnels` holds zeros: the map was created empty by this
    /// agent, and a cleared backend's tunnel is zeroed. (Writing 100,000 zeros was a
    /// third of a full sync.)
    pub tunnels_zeroed: bool,
    pub ranges: BTreeSet<RangeEntry>,
    pub vips: VipEntries,
    /// None: every word is written.
    pub filter: Option<Vec<VipFilterWord>>,
    /// The stateless services' bits (lb_common::MAP_STATELESS_FILTER). None: every
    /// word is written.
    pub stateless: Option<Vec<VipFilterWord>>,
    pub config: Option<DatapathConfig>,
    /// Backend ids cleared since the last conntrack sweep, with the backend each was
    /// (its service's key, not its id: a service id is given to the next new service at
    /// once, and that one must not take the old one's flows; and address). Not given to another backend until a sweep has deleted
    /// their flows: a new backend must not inherit an old one's flows, and sweeping at
    /// once made every removal cost a walk of the whole conntrack table. The same
    /// backend back before the sweep gets its id again, and its flows with it (its
    /// counters were moved to its service's retired traffic when it was cleared).
    pub freed: BTreeMap<u32, (ServiceKey, std::net::SocketAddr)>,
    /// Each service as last applied, with its backend ids and what its table was built
    /// with: an equal one is skipped. Empty after a restart.
    pub sources: BTreeMap<ServiceKey, Source>,
}

/// The plan's writes go to `emit` as they are made, in order: a full sync of 1,000
/// tables of 16,381 slots held as a list first was 64 MiB at once.
pub type Emit<'a> = dyn FnMut(Write) -> Result<()> + 'a;

/// A service as last applied: a digest of it and of the settings its entries were
/// built from (a copy of 100,000 backends was the agent's largest allocation), and its
/// backends' ids.
#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    pub digest: Digest,
    pub backend_ids: Vec<u32>,
}

/// 128 bits (`digest`): an accidental match is not a concern.
pub type Digest = (u64, u64);

/// The settings a service's entries are built from, besides the service itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Inputs {
    pub table_size: u32,
    pub snat: (Option<Ipv4Addr>, Option<Ipv6Addr>),
    pub icmp_echo: bool,
}

/// What a service's Maglev table was built from (hashed: 1,000 tables of 16,381 slots
/// held as slots took 64 MiB of the agent's memory) and how many slots it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WrittenTable {
    pub input: u64,
    pub slots: u64,
    pub len: u32,
}

/// One write, in the order the plan lists them.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    FilterWord(u32, VipFilterWord),
    StatelessWord(u32, VipFilterWord),
    Config(DatapathConfig),
    AddRanges(Vec<RangeEntry>),
    Backend(u32, Backend),
    Tunnel(u32, Addr),
    /// A table generation, written whole before the service entry names it.
    Table {
        id: u32,
        generation: u8,
        slots: Vec<u32>,
    },
    /// A replaced generation: deleted once no packet can still be reading it.
    Retire {
        id: u32,
        generation: u8,
        chunks: u32,
    },
    Name(u32, String),
    Service(ServiceKey, ServiceValue),
    RemoveService(ServiceKey),
    /// Both generations of a removed service's table, and its name.
    RemoveTables(u32),
    RemoveName(u32),
    /// A new service's id: the counters a removed service left under it are zeroed
    /// before anything names it.
    ResetServiceCounters(u32),
    /// A backend id cleared (backend id, its service's id): its counters move to the
    /// service's retired traffic, so the service's totals stay whole. No service: the
    /// id its entry names was given to a new service in this apply (the entry was left
    /// by a failed apply), and its counters are only zeroed.
    ClearBackend(u32, Option<u32>),
    RemoveRanges(Vec<RangeEntry>),
    Vip((u32, Addr), u32),
    RemoveVip((u32, Addr)),
}

/// What one apply changed, for logs and tests.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ApplySummary {
    pub services_added: usize,
    pub services_removed: usize,
    pub tables_written: usize,
    pub backends_added: usize,
    pub backends_removed: usize,
}

/// The map sizes ids must fit in.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_services: u32,
    pub max_backends: u32,
}

/// The writes that take the maps from `now` to `desired`, to `emit` in order. Returns
/// what the maps hold once they are done. On an error (before the first write when the
/// desired state does not fit; else from `emit`) what the maps hold is unknown and is
/// read back.
pub fn plan(
    now: Applied,
    desired: &Desired,
    limits: Limits,
    emit: &mut Emit,
) -> Result<(Applied, ApplySummary)> {
    plan_digested(now, desired, &digests(desired), limits, emit)
}

/// Each service's digest, with the settings its entries are built from: what an
/// unchanged service is recognised by (`Source::digest`). Made once per apply, for
/// `backends_to_add` and `plan_digested` both.
pub fn digests(desired: &Desired) -> Vec<Digest> {
    let settings = &desired.settings;
    let inputs = Inputs {
        table_size: settings.maglev_table_size,
        snat: (settings.snat.ipv4, settings.snat.ipv6),
        icmp_echo: settings.icmp_echo,
    };
    desired
        .services
        .iter()
        .map(|svc| digest(&(svc, inputs)))
        .collect()
}

/// `plan`, with `digests(desired)` already made.
pub fn plan_digested(
    now: Applied,
    desired: &Desired,
    digests: &[Digest],
    limits: Limits,
    emit: &mut Emit,
) -> Result<(Applied, ApplySummary)> {
    desired.check_capacity(limits.max_services, limits.max_backends)?;
    anyhow::ensure!(
        digests.len() == desired.services.len(),
        "one digest per service"
    );
    let settings = &desired.settings;
    let mut summary = ApplySummary::default();
    let mut after = now;

    // The filter holds every service there is and will be before a new service's entry
    // exists; it loses the removed ones' bits only after their entries are gone.
    let keys: Vec<ServiceKey> = desired
        .services
        .iter()
        .map(codec::model_service_key)
        .collect();
    let wanted_filter = codec::vip_filter(keys.iter().copied());
    let mut superset = codec::vip_filter(after.services.keys().copied());
    for (word, wanted) in superset.iter_mut().zip(&wanted_filter) {
        *word |= wanted;
    }
    filter_writes(emit, after.filter.as_deref(), &superset)?;
    let dp_cfg = codec::datapath_config(desired);
    if after.config != Some(dp_cfg) {
        emit(Write::Config(dp_cfg))?;
        after.config = Some(dp_cfg);
    }

    let mut service_ids = IdAllocator::new(
        after.services.values().map(|v| v.id).collect(),
        limits.max_services,
    );
    // Backend ids are free when neither in the map nor waiting for a sweep: looked up
    // as they are given out (a set of 100,000 ids made at every apply was a tenth of a
    // one-backend change).
    let mut backend_ids = IdAllocator::new(BTreeSet::new(), limits.max_backends);
    // Whether every service in the maps has a record of its last apply (not so for
    // adopted maps): then the backends to clear are those that changed services and
    // removed ones no longer name, and the rest need not be walked.
    let recorded = after.services.keys().all(|k| after.sources.contains_key(k))
        && after.sources.len() == after.services.len()
        && after
            .sources
            .values()
            .map(|s| s.backend_ids.len())
            .sum::<usize>()
            == after.backends.len();
    let mut dropped: BTreeSet<u32> = BTreeSet::new();
    // Service ids given out in this apply (`Write::ClearBackend`).
    let mut created: BTreeSet<u32> = BTreeSet::new();
    // Built at the first service with no record of its last apply (adopted maps): an
    // apply that changes one known service need not index 100,000 backends.
    let mut backend_id_of: Option<BTreeMap<(u32, std::net::SocketAddr), u32>> = None;
    let mut wanted_ranges = BTreeSet::new();
    let mut wanted_vips = VipEntries::new();
    let mut wanted_backends = BTreeSet::new();
    let mut sources = BTreeMap::new();
    let mut prebuilt: BTreeMap<usize, Result<Vec<u32>, maglev::MaglevError>> = BTreeMap::new();
    for (i, (svc, key)) in desired.services.iter().zip(&keys).enumerate() {
        if i % PREBUILD_BATCH == 0 {
            prebuilt = prebuild(
                &desired.services,
                &keys,
                i,
                &after,
                settings.maglev_table_size,
            );
        }
        let old = after.services.get(key).copied();
        let id = match old {
            Some(v) => v.id,
            None => {
                summary.services_added += 1;
                let id = service_ids.alloc().context("no free service id")?;
                emit(Write::ResetServiceCounters(id))?;
                created.insert(id);
                id
            }
        };
        let ranges = svc.source_ranges();
        let restricted = ranges.is_some();
        let mine: BTreeSet<RangeEntry> = ranges.into_iter().flatten().map(|n| (id, n)).collect();
        let serving = svc.backends.iter().any(|b| b.weight > 0);
        // A VIP answers for itself while one of its services takes new flows; echo only
        // for a service open to everyone: a VIP whose every service restricts its
        // clients tells a refused one nothing, not even that it is there.
        if serving && !svc.encapsulated {
            let flags = if restricted || !settings.icmp_echo {
                0
            } else {
                VIP_F_ECHO
            };
            let (addr, family) = addr_to_words(svc.vip);
            *wanted_vips.entry((family as u32, addr)).or_insert(0) |= flags;
        }
        // Unchanged since the last apply: nothing to write.
        let digest = digests[i];
        let last = after.sources.remove(key);
        let last = match last {
            Some(src) if src.digest == digest && old.is_some() => {
                if !recorded {
                    wanted_backends.extend(src.backend_ids.iter().copied());
                }
                wanted_ranges.extend(mine);
                sources.insert(*key, src);
                continue;
            }
            last => last,
        };
        if let Some(src) = &last {
            dropped.extend(src.backend_ids.iter().copied());
        }
        // Its backends' ids: from its last apply, or (adopted maps) from an index of
        // every backend, made once.
        let freed_here = after
            .freed
            .iter()
            .filter(|(_, (k, _))| k == key)
            .map(|(bid, (_, a))| (*a, *bid));
        let known: BTreeMap<std::net::SocketAddr, u32> = match &last {
            Some(src) => src
                .backend_ids
                .iter()
                .filter_map(|bid| after.backends.get(bid).map(|b| (backend_addr(b), *bid)))
                .chain(freed_here)
                .collect(),
            // A new service has no backends in the maps.
            None if old.is_none() => freed_here.collect(),
            None => {
                let index = backend_id_of.get_or_insert_with(|| {
                    after
                        .backends
                        .iter()
                        .map(|(id, b)| ((b.service_id, backend_addr(b)), *id))
                        .collect()
                });
                svc.backends
                    .iter()
                    .filter_map(|b| index.get(&(id, b.address)).map(|bid| (b.address, *bid)))
                    .chain(freed_here)
                    .collect()
            }
        };
        // The ranges before the flags that make the datapath read them (on the
        // service, and on its backends for established flows).
        let new: Vec<_> = mine.difference(&after.ranges).copied().collect();
        if !new.is_empty() {
            after.ranges.extend(new.iter().copied());
            emit(Write::AddRanges(new))?;
        }
        wanted_ranges.extend(mine);
        let mut ids = Vec::with_capacity(svc.backends.len());
        for b in &svc.backends {
            let value = backend_value(svc, b, id, restricted, &settings.snat);
            let bid = match known.get(&b.address) {
                Some(bid) => {
                    if after.freed.remove(bid).is_some() {
                        summary.backends_added += 1;
                    }
                    *bid
                }
                None => {
                    summary.backends_added += 1;
                    backend_ids
                        .alloc_where(|i| {
                            !after.backends.contains_key(&i) && !after.freed.contains_key(&i)
                        })
                        .context("no free backend id")?
                }
            };
            if after.backends.get(&bid) != Some(&value) {
                emit(Write::Backend(bid, value))?;
                after.backends.insert(bid, value);
            }
            // Before the table names the backend: its first packet finds it.
            let tunnel = b.via.map_or([0; 4], |a| addr_to_words(a).0);
            let known = match after.tunnels.get(&bid) {
                Some(t) => Some(*t),
                None if after.tunnels_zeroed => Some([0; 4]),
                None => None,
            };
            if known != Some(tunnel) {
                emit(Write::Tunnel(bid, tunnel))?;
            }
            if tunnel == [0; 4] && after.tunnels_zeroed {
                after.tunnels.remove(&bid);
            } else {
                after.tunnels.insert(bid, tunnel);
            }
            if !recorded {
                wanted_backends.insert(bid);
            }
            dropped.remove(&bid);
            ids.push(bid);
        }
        let weighted = svc.weighted_backends();
        let input = hash_of(&(&weighted, settings.maglev_table_size, &ids));
        let previous = after.tables.get(&id).copied();
        let live = old.map_or(0, |v| v.generation);
        // The same backends, weights, ids and size give the same table.
        let unchanged = previous.is_some_and(|w| w.input == input);
        let built = if unchanged {
            Ok(Vec::new())
        } else if let Some(table) = prebuilt.remove(&i) {
            table
        } else {
            maglev::build(&weighted, settings.maglev_table_size)
        };
        let (table_size, generation) = match built {
            Ok(_) if unchanged => (settings.maglev_table_size, live),
            Ok(table) => {
                let slots: Vec<u32> = table.iter().map(|i| ids[*i as usize]).collect();
                let written = WrittenTable {
                    input,
                    slots: hash_of(&slots),
                    len: slots.len() as u32,
                };
                let generation =
                    if previous.is_some_and(|w| w.slots == written.slots && w.len == written.len) {
                        live
                    } else {
                        // The other generation, written whole before the service entry
                        // names it; the live one is deleted once no packet can be reading
                        // it.
                        let next = if old.is_some() { live ^ 1 } else { 0 };
                        let chunks = previous.map_or(MAGLEV_MAX_CHUNKS, |w| maglev_chunks(w.len));
                        emit(Write::Table {
                            id,
                            generation: next,
                            slots,
                        })?;
                        if old.is_some() {
                            emit(Write::Retire {
                                id,
                                generation: live,
                                chunks,
                            })?;
                        }
                        summary.tables_written += 1;
                        next
                    };
                after.tables.insert(id, written);
                (settings.maglev_table_size, generation)
            }
            // No backends, or all draining: established flows keep going through
            // conntrack, new ones are dropped and counted.
            Err(maglev::MaglevError::NoBackends | maglev::MaglevError::AllDrained) => (0, live),
            Err(e) => return Err(e).with_context(|| format!("service {}", svc.name)),
        };
        let value = ServiceValue {
            id,
            table_size,
            _reserved: 0,
            flags: match svc.session_affinity {
                SessionAffinity::None => 0,
                SessionAffinity::ClientIp => SVC_F_CLIENT_AFFINITY,
            } | if restricted { SVC_F_SOURCE_RANGES } else { 0 }
                | if svc.conntrack { 0 } else { SVC_F_STATELESS },
            generation,
            _pad: 0,
        };
        if after.names.get(&id) != Some(&svc.name) {
            emit(Write::Name(id, svc.name.clone()))?;
            after.names.insert(id, svc.name.clone());
        }
        if old != Some(value) {
            emit(Write::Service(*key, value))?;
            after.services.insert(*key, value);
        }
        sources.insert(
            *key,
            Source {
                digest,
                backend_ids: ids,
            },
        );
    }
    // Removals come last: nothing points at them any more.
    let key_of: BTreeMap<u32, ServiceKey> =
        after.services.iter().map(|(k, v)| (v.id, *k)).collect();
    let wanted_keys: BTreeSet<&ServiceKey> = keys.iter().collect();
    let removed: Vec<(ServiceKey, ServiceValue)> = after
        .services
        .iter()
        .filter(|(k, _)| !wanted_keys.contains(k))
        .map(|(k, v)| (*k, *v))
        .collect();
    for (key, value) in &removed {
        emit(Write::RemoveService(*key))?;
        emit(Write::RemoveTables(value.id))?;
        emit(Write::RemoveName(value.id))?;
        after.services.remove(key);
        after.tables.remove(&value.id);
        after.names.remove(&value.id);
        summary.services_removed += 1;
    }
    let cleared: Vec<u32> = if recorded {
        // What changed services no longer name, and every backend of a removed one (the
        // records left are the removed services').
        dropped.extend(
            after
                .sources
                .values()
                .flat_map(|s| s.backend_ids.iter().copied()),
        );
        dropped
            .into_iter()
            .filter(|id| after.backends.contains_key(id))
            .collect()
    } else {
        after
            .backends
            .keys()
            .filter(|id| !wanted_backends.contains(id))
            .copied()
            .collect()
    };
    for id in &cleared {
        if let Some(b) = after.backends.remove(id) {
            let owner = (!created.contains(&b.service_id)).then_some(b.service_id);
            emit(Write::ClearBackend(*id, owner))?;
            // A backend of no known service waits all the same, matched by no service.
            let k = key_of.get(&b.service_id).copied().unwrap_or_default();
            after.freed.insert(*id, (k, backend_addr(&b)));
        }
        if after.tunnels_zeroed && after.tunnels.get(id).is_some_and(|t| *t != [0; 4]) {
            emit(Write::Tunnel(*id, [0; 4]))?;
        }
        after.tunnels.remove(id);
        summary.backends_removed += 1;
    }
    // Ranges no service wants any more, once no flag makes the datapath read them.
    let stale = source_ranges::plan(&after.ranges, &wanted_ranges).remove;
    if !stale.is_empty() {
        emit(Write::RemoveRanges(stale))?;
    }
    after.ranges = wanted_ranges;
    for (k, flags) in &wanted_vips {
        if after.vips.get(k) != Some(flags) {
            emit(Write::Vip(*k, *flags))?;
        }
    }
    for k in after.vips.keys().filter(|k| !wanted_vips.contains_key(*k)) {
        emit(Write::RemoveVip(*k))?;
    }
    after.vips = wanted_vips;
    filter_writes(emit, Some(&superset), &wanted_filter)?;
    after.filter = Some(wanted_filter);
    // A hint only (the service entry's flag decides), so in any order.
    let stateless = codec::vip_filter(
        desired
            .services
            .iter()
            .zip(&keys)
            .filter(|(svc, _)| !svc.conntrack)
            .map(|(_, k)| *k),
    );
    for (i, word) in stateless.iter().enumerate() {
        if after.stateless.as_ref().is_none_or(|w| w[i] != *word) {
            emit(Write::StatelessWord(i as u32, *word))?;
        }
    }
    after.stateless = Some(stateless);
    after.sources = sources;
    Ok((after, summary))
}

/// How many backend ids `desired` needs that `now` does not have: every backend of a
/// new service, and the new backends of the others.
pub fn backends_to_add(now: &Applied, desired: &Desired) -> usize {
    backends_to_add_digested(now, desired, &digests(desired))
}

/// `backends_to_add`, with `digests(desired)` already made: a service unchanged since
/// its last apply needs none, a changed one is compared with its own last backends,
/// and only services with no record (adopted maps) with an index of every backend.
pub fn backends_to_add_digested(now: &Applied, desired: &Desired, digests: &[Digest]) -> usize {
    let mut index: Option<BTreeSet<(u32, std::net::SocketAddr)>> = None;
    desired
        .services
        .iter()
        .zip(digests)
        .map(|(svc, digest)| {
            let key = codec::model_service_key(svc);
            let Some(v) = now.services.get(&key) else {
                return svc.backends.len();
            };
            match now.sources.get(&key) {
                Some(src) if src.digest == *digest => 0,
                Some(src) => {
                    let mine: BTreeSet<std::net::SocketAddr> = src
                        .backend_ids
                        .iter()
                        .filter_map(|id| now.backends.get(id))
                        .filter(|b| b.service_id == v.id)
                        .map(backend_addr)
                        .collect();
                    svc.backends
                        .iter()
                        .filter(|b| !mine.contains(&b.address))
                        .count()
                }
                None => {
                    let known = index.get_or_insert_with(|| {
                        now.backends
                            .values()
                            .map(|b| (b.service_id, backend_addr(b)))
                            .collect()
                    });
                    svc.backends
                        .iter()
                        .filter(|b| !known.contains(&(v.id, b.address)))
                        .count()
                }
            }
        })
        .sum()
}

/// A backend's map entry. Its mode flags say how the datapath treats the backend's
/// flows (`codec::backend_mode_flags`); the rest is health, ranges and SNAT source.
fn backend_value(
    svc: &model::Service,
    b: &model::Backend,
    service_id: u32,
    restricted: bool,
    snat: &model::Snat,
) -> Backend {
    let (addr, family) = addr_to_words(b.address.ip());
    let mut flags = codec::backend_mode_flags(svc.mode, b.local);
    if !b.healthy {
        flags |= BACKEND_F_UNHEALTHY;
    }
    if restricted {
        flags |= BACKEND_F_SVC_SOURCE_RANGES;
    }
    // A configured address wins; otherwise the route's source (`snat: auto`).
    let source: Option<IpAddr> = snat.configured(b.address.ip()).or(b.snat);
    Backend {
        addr,
        port: b.address.port().to_be(),
        family,
        flags,
        service_id,
        snat: source.map_or([0; 4], |a| addr_to_words(a).0),
        weight: b.weight,
    }
}

/// The words of `wanted` that differ from `written` (every word when unknown).
fn filter_writes(
    emit: &mut Emit,
    written: Option<&[VipFilterWord]>,
    wanted: &[VipFilterWord],
) -> Result<()> {
    for (i, word) in wanted.iter().enumerate() {
        if written.is_none_or(|w| w[i] != *word) {
            emit(Write::FilterWord(i as u32, *word))?;
        }
    }
    Ok(())
}

mod digest;
mod ids;
mod prebuild;

use digest::{digest, hash_of};
use ids::IdAllocator;
use prebuild::{prebuild, PREBUILD_BATCH};

#[cfg(test)]
mod tests;
