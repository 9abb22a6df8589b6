//! Stage 3b: a new flow picks `maglev[service][flow_hash % M]`. The table is stored
//! in chunks (see lb-common's MAGLEV_CHUNK_SLOTS), under the generation the service
//! entry names.

use lb_common::{
    flow_hash, Backend, FlowKey, MaglevKey, ServiceValue, MAGLEV_CHUNK_SLOTS, SVC_F_CLIENT_AFFINITY,
};

use crate::{
    maps::{BACKENDS, MAGLEV},
    mem::entry,
};

/// `hash`: the flow's hash (flow_hash(key, false)), computed once per packet.
#[inline(always)]
pub fn pick(svc: &ServiceValue, key: &FlowKey, hash: u32) -> Option<(u32, &'static Backend)> {
    if svc.table_size == 0 {
        return None;
    }
    let hash = if svc.flags & SVC_F_CLIENT_AFFINITY != 0 {
        flow_hash(key, true)
    } else {
        hash
    };
    let slot = hash % svc.table_size;
    let chunk_key = MaglevKey {
        service_id: svc.id,
        chunk: (slot / MAGLEV_CHUNK_SLOTS as u32) as u16,
        generation: svc.generation,
        _pad: 0,
    };
    // LLVM knows the remainder is in range and would drop the check the verifier needs;
    // black_box hides what it knows.
    let index = core::hint::black_box((slot % MAGLEV_CHUNK_SLOTS as u32) as usize);
    if index >= MAGLEV_CHUNK_SLOTS {
        return None;
    }
    // In place: a chunk is 4 KiB. The check above makes this one redundant, and LLVM
    // drops it.
    let id = *entry(&MAGLEV, &chunk_key)?.slots.get(index)?;
    // Read in place, as conntrack::lookup does.
    let backend = BACKENDS.get(id).filter(|b| b.exists())?;
    Some((id, backend))
}
