//! Stage 1b: fragments. Only a datagram's first fragment carries the ports, so the
//! later ones cannot be balanced on their own, and the LB host has no socket for a
//! VIP to reassemble them for. As Cilium does, the first fragment that xlb balances
//! records its ports under (addresses, identification, protocol); each later one
//! looks them up and then takes the flow's own path: the same conntrack entry or
//! reply entry, so the same backend and the same translation. No reassembly.
//!
//! Out of order: a later fragment that arrives before its first finds no record and
//! goes to the kernel (pass_fragment), as the host's own fragments do; for a VIP's
//! datagram that loses the datagram, as a lost fragment would.

use lb_common::{FragmentKey, FragmentValue, StatIndex, FRAGMENT_LIFETIME_S};

use crate::{
    maps::{FRAGMENTS, SCRATCH},
    mem::{self, copied, this_cpu},
    packet::{Packet, FRAG_FIRST, FRAG_LATER, FRAG_OVERLAP},
    stats,
};

const NS_PER_S: u64 = 1_000_000_000;

/// The datagram's key, which the parser put in per-CPU scratch memory.
#[inline(always)]
fn key() -> Option<&'static FragmentKey> {
    // Only the parser wrote it during this run.
    this_cpu(&SCRATCH, 0).map(|s| &s.frag)
}

/// A later fragment: its datagram's ports, from the first fragment's record. Err is
/// the reason: no record (passed), or a fragment overlapping the transport header of
/// a datagram xlb balances (dropped).
#[inline(always)]
pub fn follow(pkt: &mut Packet) -> Result<(), (u32, StatIndex)> {
    use aya_ebpf::bindings::xdp_action::{XDP_DROP, XDP_PASS};
    if pkt.frag < FRAG_LATER {
        return Ok(());
    }
    let unknown = (XDP_PASS, StatIndex::PassFragment);
    let key = key().ok_or(unknown)?;
    let rec = copied(&FRAGMENTS, key).ok_or(unknown)?;
    let now = mem::now();
    if now.saturating_sub(rec.first_seen_ns) > FRAGMENT_LIFETIME_S * NS_PER_S {
        // Its room goes back to the map now, not when the LRU gets to it.
        let _ = FRAGMENTS.remove(key);
        return Err(unknown);
    }
    if pkt.frag == FRAG_OVERLAP {
        return Err((XDP_DROP, StatIndex::DropFragmentOverlap));
    }
    pkt.key.sport = rec.sport;
    pkt.key.dport = rec.dport;
    stats::count(StatIndex::EventFragmentFollowed, 0);
    Ok(())
}

/// Records a first fragment's ports for the rest of its datagram. Anything else: a
/// no-op. Called once the packet is known to be balanced (forward or reply path).
#[inline(always)]
pub fn record(pkt: &Packet, now: u64) {
    if pkt.frag != FRAG_FIRST {
        return;
    }
    let value = FragmentValue {
        sport: pkt.key.sport,
        dport: pkt.key.dport,
        _pad: 0,
        first_seen_ns: now,
    };
    let Some(key) = key() else {
        return;
    };
    // A full LRU evicts its oldest record; failure only leaves the rest unbalanced.
    if FRAGMENTS.insert(key, value, 0).is_ok() {
        stats::count(StatIndex::EventFragmentRecorded, 0);
    }
}
