//! Reads the pinned maps back: what `xlb status` prints.

use std::{collections::BTreeMap, path::Path};

use anyhow::{Context, Result};
use aya::maps::{Map, MapData, PerCpuArray};
use lb_common::{Counter, StatIndex, MAP_GLOBAL_STATS};
use serde::Serialize;

#[derive(Serialize, Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CounterView {
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Serialize, Debug)]
pub struct Status {
    pub pin_path: String,
    /// Datapath counters by reason, summed over CPUs.
    pub counters: BTreeMap<&'static str, CounterView>,
}

fn open_pinned(pin_path: &Path, name: &str) -> Result<MapData> {
    let path = pin_path.join(name);
    MapData::from_pin(&path).with_context(|| {
        format!(
            "opening {} (is `xlb run` running with --pin-path {}?)",
            path.display(),
            pin_path.display()
        )
    })
}

/// Sums each per-CPU counter over all CPUs.
pub fn read_global_counters(pin_path: &Path) -> Result<BTreeMap<&'static str, CounterView>> {
    let map = PerCpuArray::<_, Counter>::try_from(Map::PerCpuArray(open_pinned(
        pin_path,
        MAP_GLOBAL_STATS,
    )?))?;
    let mut out = BTreeMap::new();
    for idx in StatIndex::ALL {
        let per_cpu = map.get(&(idx as u32), 0)?;
        let sum = per_cpu
            .iter()
            .fold(CounterView::default(), |acc, c| CounterView {
                packets: acc.packets + c.packets,
                bytes: acc.bytes + c.bytes,
            });
        out.insert(idx.name(), sum);
    }
    Ok(out)
}

pub fn read(pin_path: &Path) -> Result<Status> {
    Ok(Status {
        pin_path: pin_path.display().to_string(),
        counters: read_global_counters(pin_path)?,
    })
}

/// The human view: non-zero counters, one per line.
pub fn render_text(status: &Status) -> String {
    let mut s = format!("xlb status ({})\ncounters:\n", status.pin_path);
    for (name, c) in &status.counters {
        if c.packets > 0 {
            s.push_str(&format!(
                "  {name:<28} {:>12} pkts {:>14} bytes\n",
                c.packets, c.bytes
            ));
        }
    }
    s
}
