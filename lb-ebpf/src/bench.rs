//! Two helper programs for `cargo xtask bench`'s forwarding-rate part, never attached
//! by the agent: a traffic generator run with BPF_F_TEST_XDP_LIVE_FRAMES, and a sink
//! that counts what the load balancer delivered. They live in this object so the bench
//! needs no second eBPF build; their maps are small and not pinned.

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{Array, PerCpuArray},
    programs::XdpContext,
};

use crate::mem;

/// BENCH_CONFIG slots, written by the bench.
pub const CFG_FLOWS: u32 = 0;
/// The address and port the sink expects after NAT (network byte order, as in the
/// packet), and the source address (the SNAT address).
pub const CFG_DST: u32 = 1;
pub const CFG_DPORT: u32 = 2;
pub const CFG_SRC: u32 = 3;

#[map(name = "XLB_BENCH_CONFIG")]
static BENCH_CONFIG: Array<u32> = Array::with_max_entries(4, 0);

/// The frame's headers (Ethernet, IPv4, UDP), written back on every send: live frames
/// are recycled pages, and whatever the load balancer rewrote in them (addresses, MACs)
/// comes back with them.
#[map(name = "XLB_BENCH_TEMPLATE")]
static BENCH_TEMPLATE: Array<[u8; ETH_IPV4_UDP + 8]> = Array::with_max_entries(1, 0);

#[map(name = "XLB_BENCH_GEN")]
static BENCH_GEN: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// Slot 0: packets that arrived NATed as expected; slot 1: anything else.
#[map(name = "XLB_BENCH_SINK")]
static BENCH_SINK: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

const ETH_IPV4_UDP: usize = 14 + 20;

fn config(slot: u32) -> u32 {
    BENCH_CONFIG.get(slot).copied().unwrap_or(0)
}

/// Sends its test frame (Ethernet, IPv4 without options, UDP; headers from
/// XLB_BENCH_TEMPLATE) out of the interface it "arrived" on, with the UDP source port cycling over CFG_FLOWS flows, so the load
/// balancer sees many flows, not one. The UDP checksum is cleared (valid for IPv4),
/// as the port changes under it.
#[xdp]
pub fn xlb_bench_gen(ctx: XdpContext) -> u32 {
    let flows = config(CFG_FLOWS).max(1);
    let Some(n) = mem::this_cpu(&BENCH_GEN, 0) else {
        return xdp_action::XDP_ABORTED;
    };
    *n = n.wrapping_add(1);
    let seq = *n;
    let port = (10_000 + seq % flows) as u16;
    let (Some(headers), Some(template)) = (
        mem::bytes_mut::<{ ETH_IPV4_UDP + 8 }>(&ctx, 0),
        BENCH_TEMPLATE.get(0),
    ) else {
        return xdp_action::XDP_ABORTED;
    };
    *headers = *template;
    headers[ETH_IPV4_UDP..ETH_IPV4_UDP + 2].copy_from_slice(&port.to_be_bytes());
    headers[ETH_IPV4_UDP + 6] = 0;
    headers[ETH_IPV4_UDP + 7] = 0;
    xdp_action::XDP_TX
}

/// Counts UDP/IPv4 packets that arrive with the expected (translated) destination and
/// source, and other UDP/IPv4 apart, and drops both; everything else goes on to the
/// stack (the connections-per-second part uses TCP through the same interface).
#[xdp]
pub fn xlb_bench_sink(ctx: XdpContext) -> u32 {
    let Some(p) = mem::bytes_mut::<{ ETH_IPV4_UDP + 8 }>(&ctx, 0) else {
        return xdp_action::XDP_PASS;
    };
    if p[12..14] != [0x08, 0x00] || p[23] != 17 {
        return xdp_action::XDP_PASS;
    }
    let word = |at: usize| u32::from_ne_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]]);
    let dport = u16::from_ne_bytes([p[ETH_IPV4_UDP + 2], p[ETH_IPV4_UDP + 3]]) as u32;
    let hit =
        word(26) == config(CFG_SRC) && word(30) == config(CFG_DST) && dport == config(CFG_DPORT);
    if let Some(c) = mem::this_cpu(&BENCH_SINK, if hit { 0 } else { 1 }) {
        *c += 1;
    }
    xdp_action::XDP_DROP
}
