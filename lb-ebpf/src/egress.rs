//! The TC egress program: dnat replies that leave this host without passing XDP.
//!
//! In `dnat` mode a backend answers the client directly. When the backend runs on this
//! host, or in a pod on it, its reply is routed by the host and leaves through one of
//! xlb's interfaces; XDP never sees it (XDP sees what arrives). This program, attached
//! at TCX egress on the same interfaces, finds the reply's entry in REVERSE_NAT and
//! turns backend:port → client into VIP:port → client. It never drops: anything else
//! goes out untouched.
//!
//! The packet is an skb, so it is read and written through the skb helpers, and the
//! checksums are fixed with bpf_l3/l4_csum_replace, which also handle a checksum the
//! NIC will complete (CHECKSUM_PARTIAL).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK},
    programs::TcContext,
};
use lb_common::{Addr, FlowKey, StatIndex, FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP};

use crate::{
    conntrack, lookup,
    maps::CONFIG,
    mem,
    packet::{ETH_LEN, ETH_P_IP, ETH_P_IPV6, TCP_FIN, TCP_RST},
    stats,
};

/// The reply's 5-tuple and where its fields are.
struct Reply {
    key: FlowKey,
    src_off: usize,
    l4_off: usize,
    ip_check_off: usize,
    tcp_flags: u8,
}

#[inline(always)]
fn parse(ctx: &TcContext) -> Option<Reply> {
    let eth_type = u16::from_be(ctx.load::<u16>(12).ok()?);
    let mut key = FlowKey::default();
    let (src_off, l4_off, ip_check_off) = if eth_type == ETH_P_IP {
        let h = ctx.load::<[u8; 20]>(ETH_LEN).ok()?;
        let ihl = ((h[0] & 0x0f) as usize) * 4;
        // Fragments carry no ports past the first; the kernel's own NAT would not
        // touch them either.
        if h[0] >> 4 != 4 || ihl < 20 || u16::from_be_bytes([h[6], h[7]]) & 0x3fff != 0 {
            return None;
        }
        key.family = FAMILY_V4;
        key.proto = h[9];
        key.src = [u32::from_ne_bytes([h[12], h[13], h[14], h[15]]), 0, 0, 0];
        key.dst = [u32::from_ne_bytes([h[16], h[17], h[18], h[19]]), 0, 0, 0];
        (ETH_LEN + 12, ETH_LEN + ihl, ETH_LEN + 10)
    } else if eth_type == ETH_P_IPV6 {
        let h = ctx.load::<[u8; 8]>(ETH_LEN).ok()?;
        if h[0] >> 4 != 6 {
            return None;
        }
        // Replies from a backend carry no extension headers; anything with them is
        // left alone.
        key.family = FAMILY_V6;
        key.proto = h[6];
        key.src = ctx.load::<Addr>(ETH_LEN + 8).ok()?;
        key.dst = ctx.load::<Addr>(ETH_LEN + 24).ok()?;
        (ETH_LEN + 8, ETH_LEN + 40, 0)
    } else {
        return None;
    };
    if key.proto != PROTO_TCP && key.proto != PROTO_UDP {
        return None;
    }
    let ports = ctx.load::<[u16; 2]>(l4_off).ok()?;
    key.sport = ports[0];
    key.dport = ports[1];
    let tcp_flags = if key.proto == PROTO_TCP {
        ctx.load::<u8>(l4_off + 13).ok()?
    } else {
        0
    };
    Some(Reply {
        key,
        src_off,
        l4_off,
        ip_check_off,
        tcp_flags,
    })
}

#[inline(always)]
#[allow(
    clippy::unnecessary_cast,
    reason = "the binding's type is per target: u32 for BPF, i32 on the host build"
)]
pub fn reply(ctx: &TcContext) -> i32 {
    let _ = translate(ctx);
    TC_ACT_OK as i32
}

#[inline(always)]
fn translate(ctx: &TcContext) -> Option<()> {
    let r = parse(ctx)?;
    let k = &r.key;
    let cfg = CONFIG.get(0)?;
    let rev = lookup::reverse(k, cfg)?;
    // Only dnat's entries (the reply goes to the client itself); a nat entry's reply
    // goes to this host's SNAT address and never leaves it.
    if rev.client != k.dst || rev.client_port != k.dport {
        return None;
    }
    rev.last_seen_ns = mem::now();
    let check_off = if k.proto == PROTO_TCP {
        r.l4_off + 16
    } else {
        r.l4_off + 6
    };
    let mangled = if k.proto == PROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    let pseudo = BPF_F_PSEUDO_HDR as u64;
    if k.family == FAMILY_V4 {
        let (from, to) = (k.src[0] as u64, rev.vip[0] as u64);
        ctx.l4_csum_replace(check_off, from, to, pseudo | mangled | 4)
            .ok()?;
        ctx.l3_csum_replace(r.ip_check_off, from, to, 4).ok()?;
        ctx.store(r.src_off, &rev.vip[0], 0).ok()?;
    } else {
        let diff = mem::csum_diff(&k.src, &rev.vip, 0);
        ctx.l4_csum_replace(check_off, 0, diff as u64, pseudo | mangled)
            .ok()?;
        ctx.store(r.src_off, &rev.vip, 0).ok()?;
    }
    ctx.l4_csum_replace(check_off, k.sport as u64, rev.vip_port as u64, mangled | 2)
        .ok()?;
    ctx.store(r.l4_off, &rev.vip_port, 0).ok()?;
    if r.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        let forward_key = FlowKey {
            src: rev.client,
            dst: rev.vip,
            sport: rev.client_port,
            dport: rev.vip_port,
            ..*k
        };
        conntrack::mark(&forward_key, r.tcp_flags, cfg);
    }
    let len = ctx.len() as u64;
    stats::count_flow(rev.backend_id, len, false);
    stats::count(StatIndex::EventEgressTranslated, len);
    Some(())
}
