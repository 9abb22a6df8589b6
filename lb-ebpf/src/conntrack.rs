//! Connection tracking for the forward path, in xlb's flow table (flows.rs).
//!
//! Idle timeouts are checked here, in the datapath, against `last_seen_ns`: an entry
//! older than its timeout counts as a miss and the flow is balanced afresh, and a full
//! bucket gives up such entries first. TCP entries that saw FIN or RST use the short
//! closing timeout; TCP entries whose handshake never completed (a SYN flood's,
//! spoofed or not) the SYN timeout, and a full bucket gives them up before any
//! established flow.

use lb_common::{
    flow_hash, reply_key, Addr, Backend, ConnValue, DatapathConfig, FlowKey, ReverseNat, StatIndex,
    CT_F_ESTABLISHED, CT_F_FIN_SEEN, CT_F_RST_SEEN, MODE_DSR, PROTO_TCP,
};

use crate::{
    flows::{self, timeout_ns},
    maps::BACKENDS,
    mem::zero,
    packet::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    stats,
};

#[inline(always)]
pub fn flags_from_tcp(tcp_flags: u8) -> u8 {
    let mut f = 0;
    if tcp_flags & TCP_FIN != 0 {
        f |= CT_F_FIN_SEEN;
    }
    if tcp_flags & TCP_RST != 0 {
        f |= CT_F_RST_SEEN;
    }
    if tcp_flags & (TCP_ACK | TCP_SYN) == TCP_ACK {
        f |= CT_F_ESTABLISHED;
    }
    f
}

/// An established flow whose backend still exists: its entry (refreshed, in the table:
/// valid for this program run) and its backend. `hash`: the flow's hash.
#[inline(always)]
pub fn lookup<'run>(
    key: &FlowKey,
    hash: u32,
    tcp_flags: u8,
    now: u64,
    cfg: &DatapathConfig,
) -> Option<(&'run mut ConnValue, &'static Backend)> {
    let ct = flows::find::<ConnValue>(key, hash, cfg)?;
    if now.saturating_sub(ct.last_seen_ns) > timeout_ns(key.proto, ct.flags, cfg) {
        return None;
    }
    // Read in place, not copied (a profile put the 44-byte copy at a tenth of the
    // program's own samples; measured, 1-4 ns). A copy would not have made the read
    // atomic either: the agent rewrites a slot whole only when the backend's weight,
    // health, mode or SNAT source changes (its address and port stay), and clears it
    // when the backend goes, before its flows are swept.
    let backend = BACKENDS.get(ct.backend_id).filter(|b| b.exists())?;
    ct.last_seen_ns = now;
    let flags = flags_from_tcp(tcp_flags);
    if flags & !ct.flags & CT_F_ESTABLISHED != 0 && backend.mode() != MODE_DSR {
        reply_established(key, ct, backend, cfg);
    }
    ct.flags |= flags;
    Some((ct, backend))
}

/// The handshake just completed (once per flow): the reply entry nat and dnat made
/// for the flow, which a full bucket ranks by its own flags, is established too.
#[inline(always)]
fn reply_established(key: &FlowKey, ct: &ConnValue, backend: &Backend, cfg: &DatapathConfig) {
    let rkey = reply_key(key, ct, backend);
    let hash = flow_hash(&rkey, false);
    if let Some(rev) = flows::find::<ReverseNat>(&rkey, hash, cfg) {
        rev.flags |= CT_F_ESTABLISHED;
    }
}

/// How a new flow is kept: `flooded`, the flood guard is on; `stateless`, its service
/// asked for no entry (`conntrack: false`).
#[derive(Clone, Copy)]
pub struct Keep {
    pub flooded: bool,
    pub stateless: bool,
}

/// A new flow's entry, written into `ct` (per-CPU scratch) and inserted from there,
/// unless the flood guard is on or the service is stateless: the next packet of the
/// flow then picks the same backend by Maglev. Returns `ct`, the scratch copy.
#[inline(always)]
pub fn create<'run>(
    ct: &'run mut ConnValue,
    (pkt, hash): (&Packet, u32),
    backend_id: u32,
    (nat_addr, nat_port): (Addr, u16),
    (now, keep, cfg): (u64, Keep, &DatapathConfig),
    len: u64,
) -> &'run mut ConnValue {
    let key = &pkt.key;
    // The next hop is kept in the literal and zeroed after it (see nat::reply_entry).
    *ct = ConnValue {
        backend_id,
        nat_port,
        flags: flags_from_tcp(pkt.tcp_flags),
        _pad: 0,
        nat_addr,
        last_seen_ns: now,
        hop: ct.hop,
    };
    zero(&mut ct.hop);
    if keep.stateless {
        return ct;
    }
    if keep.flooded {
        stats::count(StatIndex::EventFloodStateless, len);
    } else {
        // By reference: a copy would take stack. Busy only means another CPU held the
        // bucket (counted); the next packet retries.
        let value: &ConnValue = ct;
        let _ = flows::insert((key, hash), value, true, cfg);
    }
    if key.proto == PROTO_TCP && pkt.tcp_flags & TCP_SYN == 0 {
        stats::count(StatIndex::EventFlowRecreated, len);
    }
    ct
}

/// A backend's reply: its state on the reply entry (what a full bucket ranks it by),
/// and a FIN or RST closes the flow as one from the client does: its conntrack entry
/// (found from the reply entry `rev`) takes the short closing timeout.
#[inline(always)]
pub fn mark_reply(pkt: &Packet, rev: &mut ReverseNat, cfg: &DatapathConfig) {
    rev.flags |= flags_from_tcp(pkt.tcp_flags);
    if pkt.tcp_flags & (TCP_FIN | TCP_RST) == 0 {
        return;
    }
    let forward_key = FlowKey {
        src: rev.client,
        dst: rev.vip,
        sport: rev.client_port,
        dport: rev.vip_port,
        ..pkt.key
    };
    mark(&forward_key, pkt.tcp_flags, cfg);
}

/// Records FIN/RST seen on the reply side in the forward entry.
#[inline(always)]
pub fn mark(key: &FlowKey, tcp_flags: u8, cfg: &DatapathConfig) {
    let hash = flow_hash(key, false);
    if let Some(ct) = flows::find::<ConnValue>(key, hash, cfg) {
        ct.flags |= flags_from_tcp(tcp_flags);
    }
}

/// Ends a flow at once: its entry, and the reply entry nat and dnat made for it (keyed
/// backend → the source it saw). The next packet of the flow starts afresh.
#[inline(always)]
pub fn cut(key: &FlowKey, hash: u32, ct: &ConnValue, backend: &Backend, cfg: &DatapathConfig) {
    let rkey = reply_key(key, ct, backend);
    let rhash = flow_hash(&rkey, false);
    flows::remove::<ReverseNat>(&rkey, rhash, cfg);
    flows::remove::<ConnValue>(key, hash, cfg);
}
