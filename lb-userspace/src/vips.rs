//! XLB_VIPS: the VIPs with a service that can take new flows, and what the datapath
//! answers for the address itself (ICMP echo, `icmp_echo:`). Written by each apply as
//! a difference against what was last written.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use aya::maps::{HashMap, MapData};
use lb_common::{VipKey, MAP_VIPS};

/// What the map should hold: each servable VIP and its flags.
pub type Wanted = BTreeMap<(u32, [u32; 4]), u32>;

fn key(&(family, addr): &(u32, [u32; 4])) -> VipKey {
    VipKey { addr, family }
}

fn map(ebpf: &mut aya::Ebpf) -> Result<HashMap<&mut MapData, VipKey, u32>> {
    Ok(HashMap::try_from(
        ebpf.map_mut(MAP_VIPS).context("VIP map")?,
    )?)
}

/// What the pinned map holds (an adopted map: written by an earlier agent).
pub fn read(ebpf: &mut aya::Ebpf) -> Result<Wanted> {
    map(ebpf)?
        .iter()
        .map(|e| e.map(|(k, v)| ((k.family, k.addr), v)))
        .collect::<Result<_, _>>()
        .context("reading the VIP map")
}

/// Writes what changed from `written` to `wanted`.
pub fn write(ebpf: &mut aya::Ebpf, written: &Wanted, wanted: &Wanted) -> Result<()> {
    let mut m = map(ebpf)?;
    for (k, flags) in wanted {
        if written.get(k) != Some(flags) {
            m.insert(key(k), flags, 0)
                .context("writing a VIP's entry")?;
        }
    }
    for k in written.keys().filter(|k| !wanted.contains_key(*k)) {
        // Already gone is fine.
        let _ = m.remove(&key(k));
    }
    Ok(())
}
