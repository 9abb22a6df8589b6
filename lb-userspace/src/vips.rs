//! XLB_VIPS: the VIPs with a service that can take new flows, and what the datapath
//! answers for the address itself (ICMP echo, `icmp_echo:`). Written by each apply as
//! a difference against what was last written (`dataplane::plan`).

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

pub fn set(ebpf: &mut aya::Ebpf, vip: (u32, [u32; 4]), flags: u32) -> Result<()> {
    map(ebpf)?
        .insert(key(&vip), flags, 0)
        .context("writing a VIP's entry")
}

pub fn remove(ebpf: &mut aya::Ebpf, vip: (u32, [u32; 4])) -> Result<()> {
    // Already gone is fine.
    let _ = map(ebpf)?.remove(&key(&vip));
    Ok(())
}
