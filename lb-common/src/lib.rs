//! Types shared by the XDP program and the userspace agent.
//!
//! Everything here is `#[repr(C)]` with explicit padding, so that the byte layout the
//! kernel sees is the one both sides compile. Addresses and ports are kept in network
//! byte order, exactly as they sit in the packet: the datapath never swaps bytes on
//! the hot path, and userspace converts at the edge.
#![no_std]

pub mod flows;
pub mod hash;
pub mod maps;
pub mod stats;

pub use flows::*;
pub use hash::flow_hash;
pub use maps::*;
pub use stats::*;
