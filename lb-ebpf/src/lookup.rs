//! Stage 2: is this packet for a service (forward path) or a reply to a NAT flow
//! (reverse path)?

use aya_ebpf::bindings::xdp_action;
use lb_common::{
    flow_hash,
    hash::{vip_filter_bit, vip_filter_slot},
    DatapathConfig, FlowKey, ReverseNat, ServiceKey, ServiceValue, StatIndex, SVC_KEY_ENCAPSULATED,
};

use crate::{
    flows,
    maps::{SERVICES, STATELESS_FILTER, VIP_FILTER},
    mem::copied,
    packet::Verdict,
};

/// Neither a service's packet nor a reply: the host's own traffic, passed.
pub const NOT_A_VIP: Verdict = (xdp_action::XDP_PASS, StatIndex::PassNotVip);

/// False when the packet is for no service, known without the hashed lookup: the
/// agent has filled the VIP filter and the packet's bit is clear. Most of a host's
/// traffic is not for a VIP, and this is its cheaper way through.
#[inline(always)]
pub fn may_be_service(key: &FlowKey, cfg: &DatapathConfig) -> bool {
    if cfg.vip_filter == 0 {
        return true;
    }
    let (word, mask) = vip_filter_slot(vip_filter_bit(&key.dst, key.dport, key.proto));
    VIP_FILTER.get(word).is_none_or(|w| w & mask != 0)
}

/// Whether the packet may be for a stateless service (lb_common::MAP_STATELESS_FILTER).
#[inline(always)]
pub fn may_be_stateless(key: &FlowKey) -> bool {
    let (word, mask) = vip_filter_slot(vip_filter_bit(&key.dst, key.dport, key.proto));
    STATELESS_FILTER.get(word).is_some_and(|w| w & mask != 0)
}

/// The service a client's packet is for; `encapsulated`: the packet arrived in a tunnel
/// to this host, and only services for such packets apply (SVC_KEY_ENCAPSULATED).
#[inline(always)]
pub fn service(key: &FlowKey, encapsulated: bool) -> Option<ServiceValue> {
    let marker = if encapsulated {
        SVC_KEY_ENCAPSULATED
    } else {
        0
    };
    let sk = ServiceKey {
        vip: key.dst,
        port: key.dport,
        proto: key.proto,
        family: key.family | marker,
    };
    // A concurrent update replaces the element under RCU: the copy is either the old
    // or the new value.
    copied(&SERVICES, &sk)
}

/// False when the packet cannot be a reply to a NAT flow: a nat reply comes to a port
/// of the SNAT range, which is kept apart from the host's own ephemeral ports, so the
/// rest of the host's traffic skips the lookup (unless dnat is in use, whose replies
/// come to the client's own port).
#[inline(always)]
pub fn may_be_reply(key: &FlowKey, cfg: &DatapathConfig) -> bool {
    let dport = u16::from_be(key.dport);
    cfg.dnat_in_use != 0 || (dport >= cfg.snat_port_min && dport <= cfg.snat_port_max)
}

/// The NAT entry whose reply 5-tuple is exactly this packet's.
#[inline(always)]
pub fn reverse<'run>(key: &FlowKey, cfg: &DatapathConfig) -> Option<&'run mut ReverseNat> {
    let hash = flow_hash(key, false);
    flows::find(key, hash, cfg)
}
