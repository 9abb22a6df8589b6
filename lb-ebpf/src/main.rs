//! xlb's XDP program. The pipeline reads top to bottom: parse, look the service up,
//! then translate and forward (see DESIGN.md). Each stage is a module.
#![no_std]
#![no_main]

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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
