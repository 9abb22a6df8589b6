//! Stage 2: is this packet for a service (forward path) or a reply to a NAT flow
//! (reverse path)?

use lb_common::{FlowKey, ReverseNat, ServiceKey, ServiceValue};

use crate::maps::{REVERSE_NAT, SERVICES};

#[inline(always)]
pub fn service(key: &FlowKey) -> Option<ServiceValue> {
    let sk = ServiceKey {
        vip: key.dst,
        port: key.dport,
        proto: key.proto,
        family: key.family,
    };
    // SAFETY: the value is copied out at once; a concurrent update replaces the element
    // under RCU, so the copy is either the old or the new value.
    unsafe { SERVICES.get(sk) }.copied()
}

/// The NAT entry whose reply 5-tuple is exactly this packet's.
#[inline(always)]
pub fn reverse(key: &FlowKey) -> Option<*mut ReverseNat> {
    REVERSE_NAT.get_ptr_mut(key)
}
