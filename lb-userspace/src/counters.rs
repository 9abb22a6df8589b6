//! The datapath's counters by reason (XLB_GLOBAL_STATS), summed over CPUs: what
//! `xlb status`, the metrics and the agent's warnings read. One of them is derived
//! rather than counted (StatIndex::is_derived).

use std::{collections::BTreeMap, path::Path};

use anyhow::Result;
use aya::maps::{Map, PerCpuArray};
use lb_common::{Counter, StatIndex, MAP_GLOBAL_STATS};
use serde::Serialize;

use crate::dataplane::open_pinned;

#[derive(Serialize, Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CounterView {
    pub packets: u64,
    pub bytes: u64,
}

impl CounterView {
    fn plus(self, other: CounterView) -> CounterView {
        CounterView {
            packets: self.packets + other.packets,
            bytes: self.bytes + other.bytes,
        }
    }
}

/// Sums each per-CPU counter over all CPUs. The one the datapath does not count
/// (StatIndex::is_derived) is the `Seen*` totals less every other reason's.
pub fn read_global_counters(pin_path: &Path) -> Result<BTreeMap<&'static str, CounterView>> {
    let map = PerCpuArray::<_, Counter>::try_from(Map::PerCpuArray(open_pinned(
        pin_path,
        MAP_GLOBAL_STATS,
    )?))?;
    let mut out = BTreeMap::new();
    for idx in StatIndex::ALL {
        let per_cpu = map.get(&(idx as u32), 0)?;
        let sum = per_cpu.iter().fold(CounterView::default(), |acc, c| {
            acc.plus(CounterView {
                packets: c.packets,
                bytes: c.bytes,
            })
        });
        out.insert(idx.name(), sum);
    }
    let total = |pick: fn(&StatIndex) -> bool| {
        StatIndex::ALL
            .iter()
            .filter(|i| pick(i))
            .fold(CounterView::default(), |acc, i| acc.plus(out[i.name()]))
    };
    let seen = total(|i| i.is_seen());
    let counted = total(|i| i.is_reason() && !i.is_derived());
    let derived = CounterView {
        packets: seen.packets.saturating_sub(counted.packets),
        bytes: seen.bytes.saturating_sub(counted.bytes),
    };
    for idx in StatIndex::ALL.into_iter().filter(|i| i.is_derived()) {
        out.insert(idx.name(), monotonic(pin_path, seen.packets, derived));
    }
    Ok(out)
}

/// The derived counter, never lower than this process last reported for the same
/// maps. The counters are read one after another while packets are counted, so a
/// reason read after a packet's `Seen*` was can make one reading short by the packets
/// in between, and the next one long: a counter that went down would read as a reset
/// to Prometheus. `seen` (the `Seen*` total, which only grows while the maps live)
/// going down means the maps were replaced: their counters start again from zero.
fn monotonic(pin_path: &Path, seen: u64, derived: CounterView) -> CounterView {
    static LAST: std::sync::Mutex<BTreeMap<std::path::PathBuf, (u64, CounterView)>> =
        std::sync::Mutex::new(BTreeMap::new());
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    let (last_seen, last_derived) = last.entry(pin_path.to_path_buf()).or_default();
    let out = if seen >= *last_seen {
        CounterView {
            packets: derived.packets.max(last_derived.packets),
            bytes: derived.bytes.max(last_derived.bytes),
        }
    } else {
        derived
    };
    (*last_seen, *last_derived) = (seen, out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_derived_counter_never_goes_down_while_the_maps_live() {
        let pin = Path::new("/nonexistent/monotonic-test");
        let v = |packets, bytes| CounterView { packets, bytes };
        assert_eq!(monotonic(pin, 10, v(5, 500)), v(5, 500));
        // A reading short by packets counted between two reads: held at the last.
        assert_eq!(monotonic(pin, 12, v(4, 400)), v(5, 500));
        assert_eq!(monotonic(pin, 13, v(7, 700)), v(7, 700));
        // Fewer seen: new maps, counting from zero again.
        assert_eq!(monotonic(pin, 3, v(1, 100)), v(1, 100));
        assert_eq!(monotonic(pin, 4, v(2, 200)), v(2, 200));
        // Another pin path keeps its own: (4, 2 packets) above would hold this one.
        let other = Path::new("/nonexistent/monotonic-other");
        assert_eq!(monotonic(other, 100, v(1, 100)), v(1, 100));
    }
}
