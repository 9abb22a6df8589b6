//! Flows carried over from what earlier agents pinned as XLB_CONNTRACK and
//! XLB_REVERSE_NAT, which an upgrade replaces:
//! - the kernel LRU maps of the agents before xlb's own flow table (another layout);
//! - flow tables of this layout whose flows are bucketed by the earlier flow hash
//!   (bucket 0's format word is not lb_common::FLOW_TABLE_FORMAT): adopted as they
//!   are, this version would look for each flow in another bucket.
//!
//! Their flows would be lost with them. They are read before the old maps are
//! unpinned, and written into the new tables (each into the bucket of its new hash)
//! before the new program is attached.
//! The old program keeps running on the old maps until then: a flow it makes in that
//! window is not carried (its next packet makes it again).

use std::path::Path;

use anyhow::{Context, Result};
use aya::maps::{HashMap, Map, MapData, MapInfo, MapType};
use lb_common::{
    ConnValue, FlowBucket, FlowKey, ReverseNat, CT_F_ESTABLISHED, MAP_CONNTRACK, MAP_REVERSE_NAT,
};
use tracing::{info, warn};

use super::Dataplane;
use crate::flows::FlowTable;

/// The old maps' flows, as read.
#[derive(Default)]
pub struct Carried {
    flows: Vec<(FlowKey, ConnValue)>,
    replies: Vec<(FlowKey, ReverseNat)>,
}

/// Reads the flows of what is pinned, if it is one of the earlier tables (module
/// comment). Anything else carries nothing.
pub fn take(pin_path: &Path) -> Carried {
    let mut out = Carried::default();
    match read::<ConnValue>(&pin_path.join(MAP_CONNTRACK)) {
        Ok(Some(flows)) => out.flows = flows,
        Ok(None) => {}
        Err(e) => warn!("the pinned conntrack map of an earlier version could not be read; its flows are not carried over: {e:#}"),
    }
    match read::<ReverseNat>(&pin_path.join(MAP_REVERSE_NAT)) {
        Ok(Some(replies)) => out.replies = replies,
        Ok(None) => {}
        Err(e) => warn!("the pinned reverse-NAT map of an earlier version could not be read; its entries are not carried over: {e:#}"),
    }
    out
}

fn read<V: aya::Pod>(pin: &Path) -> Result<Option<Vec<(FlowKey, V)>>> {
    if !pin.exists() {
        return Ok(None);
    }
    let info = MapInfo::from_pin(pin)?;
    if let Some(table) = earlier_hash_table::<V>(pin, &info)? {
        return Ok(Some(table.entries().map(|e| (e.key, e.value)).collect()));
    }
    let old_layout = matches!(info.map_type(), Ok(MapType::LruHash))
        && info.key_size() as usize == std::mem::size_of::<FlowKey>()
        && info.value_size() as usize == std::mem::size_of::<V>();
    if !old_layout {
        return Ok(None);
    }
    let map = HashMap::<_, FlowKey, V>::try_from(Map::LruHashMap(MapData::from_pin(pin)?))?;
    let entries = map
        .iter()
        .collect::<Result<Vec<_>, _>>()
        .context("reading the entries")?;
    Ok(Some(entries))
}

/// Whether the map pinned at `pin` (of `info`) is a flow table of this layout whose
/// flows are bucketed by the earlier flow hash (module comment): to be replaced, its
/// flows carried. Either table: the format word is in the bucket's header, which is
/// the same for both value types.
pub fn earlier_hash(pin: &Path, info: &MapInfo) -> Result<bool> {
    Ok(earlier_hash_table::<ConnValue>(pin, info)?.is_some())
}

/// `earlier_hash`'s table, opened (for its flows); None for anything else.
fn earlier_hash_table<V: Copy>(pin: &Path, info: &MapInfo) -> Result<Option<FlowTable<V>>> {
    let table = matches!(info.map_type(), Ok(MapType::Array))
        && info.value_size() as usize == std::mem::size_of::<FlowBucket<V>>();
    if !table {
        return Ok(None);
    }
    let table = FlowTable::<V>::from_pin(pin)?;
    Ok((!table.current_format()?).then_some(table))
}

impl Dataplane {
    /// Writes the carried flows into the new tables. Call before the program is
    /// attached: the tables are written without the datapath's insert lock.
    pub fn put_carried(&self, carried: Carried) -> Result<()> {
        if carried.flows.is_empty() && carried.replies.is_empty() {
            return Ok(());
        }
        let (ct, rev) = (self.conntrack()?, self.reverse_nat()?);
        let mut left = 0;
        for (k, v) in &carried.flows {
            left += usize::from(!ct.insert(k, v));
        }
        for (k, v) in &carried.replies {
            // The old entries had no state of their own: their flows are live, and a
            // full bucket must not take them for half-open ones.
            let v = ReverseNat {
                flags: CT_F_ESTABLISHED,
                ..*v
            };
            left += usize::from(!rev.insert(k, &v));
        }
        info!(
            flows = carried.flows.len(),
            replies = carried.replies.len(),
            not_carried = left,
            "flows carried over from the conntrack maps of an earlier version"
        );
        Ok(())
    }
}
