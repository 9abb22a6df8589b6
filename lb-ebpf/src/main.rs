//! xlb's XDP program. The pipeline reads top to bottom: parse, look the service up,
//! then translate and forward (see DESIGN.md). Each stage is a module.
// On the host (cargo clippy/build --workspace) this compiles as an empty binary, so
// the code is still type-checked and linted; the real build is for target_arch = "bpf".
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

mod maps;
mod mem;
mod parse;
mod stats;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::StatIndex;

#[xdp]
pub fn xlb(ctx: XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u64;
    let (seen, parsed) = parse::parse(&ctx);
    stats::count(seen, len);
    let verdict = match parsed {
        Ok(_pkt) => StatIndex::PassNotVip,
        Err(reason) => reason,
    };
    stats::count(verdict, len);
    xdp_action::XDP_PASS
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
