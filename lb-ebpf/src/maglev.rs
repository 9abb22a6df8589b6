//! Stage 3b: a new flow picks `maglev[service][flow_hash % M]`.

use lb_common::{
    flow_hash, Backend, FlowKey, ServiceValue, MAGLEV_MAX_TABLE_SIZE, SVC_F_CLIENT_AFFINITY,
};

use crate::maps::{BACKENDS, MAGLEV};

#[inline(always)]
pub fn pick(svc: &ServiceValue, key: &FlowKey) -> Option<(u32, Backend)> {
    if svc.table_size == 0 {
        return None;
    }
    let slot = (flow_hash(key, svc.flags & SVC_F_CLIENT_AFFINITY != 0) % svc.table_size) as usize;
    if slot >= MAGLEV_MAX_TABLE_SIZE {
        return None;
    }
    let table = MAGLEV.get_ptr(svc.id)?;
    // SAFETY: a valid map value pointer; slot < MAGLEV_MAX_TABLE_SIZE was checked above.
    let id = unsafe { *(*table).slots.as_ptr().add(slot) };
    // SAFETY: copied out at once.
    let backend = unsafe { BACKENDS.get(id) }.copied()?;
    Some((id, backend))
}
