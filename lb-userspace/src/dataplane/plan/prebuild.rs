//! New services' Maglev tables, built ahead on every CPU.

use std::collections::BTreeMap;

use lb_common::ServiceKey;

use super::Applied;
use crate::{maglev, model};

/// Services whose Maglev tables are built ahead, on every CPU, a batch at a time: a
/// full sync of 1,000 tables spent half its time building them one after another,
/// and a batch bounds the tables held at once.
pub(super) const PREBUILD_BATCH: usize = 32;

/// The tables of the new services among `services[from..from + PREBUILD_BATCH]` (a
/// new service has no table to keep, so its table is certainly built; a table depends
/// only on the backends, their weights and the size), by index.
pub(super) fn prebuild(
    services: &[model::Service],
    keys: &[ServiceKey],
    from: usize,
    now: &Applied,
    m: u32,
) -> BTreeMap<usize, Result<Vec<u32>, maglev::MaglevError>> {
    let todo: Vec<(usize, Vec<maglev::WeightedBackend>)> =
        (from..services.len().min(from + PREBUILD_BATCH))
            .filter(|i| !now.services.contains_key(&keys[*i]))
            .map(|i| (i, services[i].weighted_backends()))
            .collect();
    if todo.len() < 2 {
        return BTreeMap::new();
    }
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(todo.len());
    let per = todo.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = todo
            .chunks(per)
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .map(|(i, w)| (*i, maglev::build(w, m)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("a Maglev build does not panic"))
            .collect()
    })
}
