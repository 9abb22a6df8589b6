//! Connection tracking for the forward path.
//!
//! Idle timeouts are checked here, in the datapath, against `last_seen_ns`: an entry
//! older than its timeout counts as a miss and the flow is balanced afresh. No sweeper
//! is needed; the LRU map reclaims old entries under pressure. TCP entries that saw
//! FIN or RST use the short closing timeout; TCP entries whose handshake never
//! completed (a SYN flood's, spoofed or not) the SYN timeout, so they neither fill the
//! table for an hour nor outlive established flows in it.

use lb_common::{
    Addr, Backend, ConnValue, DatapathConfig, FlowKey, ReverseNat, StatIndex, CT_F_ESTABLISHED,
    CT_F_FIN_SEEN, CT_F_RST_SEEN, PROTO_TCP,
};

use crate::{
    maps::{BACKENDS, CONNTRACK, REVERSE_NAT},
    mem::{entry, zero},
    packet::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    stats,
};

const NS_PER_S: u64 = 1_000_000_000;

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

#[inline(always)]
fn timeout_ns(proto: u8, flags: u8, cfg: &DatapathConfig) -> u64 {
    let s = if proto != PROTO_TCP {
        cfg.udp_idle_timeout_s
    } else if flags & (CT_F_FIN_SEEN | CT_F_RST_SEEN) != 0 {
        cfg.tcp_closing_timeout_s
    } else if flags & CT_F_ESTABLISHED == 0 {
        cfg.tcp_syn_timeout_s
    } else {
        cfg.tcp_idle_timeout_s
    };
    s as u64 * NS_PER_S
}

/// An established flow whose backend still exists: its entry (refreshed, in the map:
/// valid for this program run) and its backend.
#[inline(always)]
pub fn lookup<'run>(
    key: &FlowKey,
    tcp_flags: u8,
    now: u64,
    cfg: &DatapathConfig,
) -> Option<(&'run mut ConnValue, &'static Backend)> {
    // Other CPUs may write the same entry: its fields are each written whole.
    let ct = entry(&CONNTRACK, key)?;
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
    ct.flags |= flags_from_tcp(tcp_flags);
    Some((ct, backend))
}

/// A new flow's entry, written into `ct` (per-CPU scratch) and inserted from there,
/// unless the flood guard is on (`flooded`): the next packet of the flow then picks
/// the same backend by Maglev. Returns `ct`, the scratch copy.
#[inline(always)]
pub fn create<'run>(
    ct: &'run mut ConnValue,
    pkt: &Packet,
    backend_id: u32,
    (nat_addr, nat_port): (Addr, u16),
    (now, flooded): (u64, bool),
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
    if flooded {
        stats::count(StatIndex::EventFloodStateless, len);
    } else {
        // By reference: a copy would take stack. Failure only means the LRU could not
        // take it now; the next packet retries.
        let value: &ConnValue = ct;
        let _ = CONNTRACK.insert(key, value, 0);
    }
    if key.proto == PROTO_TCP && pkt.tcp_flags & TCP_SYN == 0 {
        stats::count(StatIndex::EventFlowRecreated, len);
    }
    ct
}

/// A FIN or RST from the backend closes the flow as one from the client does: its
/// conntrack entry (found from the reply entry `rev`) takes the short closing timeout.
#[inline(always)]
pub fn mark_reply(pkt: &Packet, rev: &ReverseNat) {
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
    mark(&forward_key, pkt.tcp_flags);
}

/// Records FIN/RST seen on the reply side in the forward entry.
#[inline(always)]
pub fn mark(key: &FlowKey, tcp_flags: u8) {
    if let Some(ct) = entry(&CONNTRACK, key) {
        ct.flags |= flags_from_tcp(tcp_flags);
    }
}

/// Ends a flow at once: its entry, and the reply entry nat and dnat made for it (keyed
/// backend → the source it saw). The next packet of the flow starts afresh.
#[inline(always)]
pub fn cut(key: &FlowKey, ct: &ConnValue, backend: &Backend) {
    let reply = FlowKey {
        src: backend.addr,
        dst: ct.nat_addr,
        sport: backend.port,
        dport: ct.nat_port,
        proto: key.proto,
        family: key.family,
        _pad: [0; 2],
    };
    // Failure means the entry is already gone.
    let _ = REVERSE_NAT.remove(reply);
    let _ = CONNTRACK.remove(key);
}
