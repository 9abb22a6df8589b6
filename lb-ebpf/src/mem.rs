//! The only place that touches packet memory through raw pointers. Every access is
//! bounds-checked against `data_end` in the form the verifier recognises.

use aya_ebpf::{
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::Addr;

/// The deepest header offset the program reads (Ethernet + IPv6 + four extension
/// headers of the largest size is far beyond any real packet; 4 KiB covers jumbo frames).
pub const MAX_HEADER_OFFSET: usize = 4095;

/// A pointer to a `T` at `offset` bytes into the packet, if the whole `T` is inside it.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let (start, end) = (ctx.data(), ctx.data_end());
    // Offsets that went through memory (the ICMP scratch map) reach the verifier
    // unbounded; an explicit bound lets it accept pointer arithmetic with them. No
    // header we read lies deeper.
    if offset > MAX_HEADER_OFFSET {
        return None;
    }
    // A no-op after the check above, but LLVM may do the arithmetic below on another
    // copy of `offset` than the one it compared; the mask bounds whichever it uses.
    let offset = offset & MAX_HEADER_OFFSET;
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// Copies a header out of the packet.
#[inline(always)]
pub fn load<T: Copy>(ctx: &XdpContext, offset: usize) -> Option<T> {
    // SAFETY: ptr_at checked that size_of::<T>() bytes at offset are inside the packet;
    // read_unaligned because packet headers have no alignment guarantee.
    ptr_at::<T>(ctx, offset).map(|p| unsafe { core::ptr::read_unaligned(p) })
}

/// Writes a header back into the packet.
#[inline(always)]
pub fn store<T: Copy>(ctx: &XdpContext, offset: usize, value: T) -> Option<()> {
    // SAFETY: bounds checked by ptr_at; the frame is ours to modify during the call.
    ptr_at::<T>(ctx, offset).map(|p| unsafe { core::ptr::write_unaligned(p, value) })
}

/// Mutable access to `N` bytes of the packet, for several writes under one bounds
/// check (separate checks let LLVM merge pointer arithmetic the verifier then rejects).
#[inline(always)]
#[expect(
    clippy::mut_from_ref,
    reason = "XdpContext only points at the frame; the frame itself is the program's to write"
)]
pub fn bytes_mut<const N: usize>(ctx: &XdpContext, offset: usize) -> Option<&mut [u8; N]> {
    // SAFETY: bounds checked by ptr_at; [u8; N] has alignment 1; the frame is ours to
    // modify while the context lives, and no other reference to these bytes is live.
    ptr_at::<[u8; N]>(ctx, offset).map(|p| unsafe { &mut *p })
}

/// Plain data for which all-zero bytes are a valid value, in whole aligned 32-bit
/// words: what `zero` may be used on.
///
/// # Safety
/// The implementing type must accept all-zero bytes, have a size that is a multiple
/// of 4 and an alignment of at least 4.
pub unsafe trait Zeroable {}

// SAFETY: integers and byte arrays only; 32 bytes, aligned to 8.
unsafe impl Zeroable for lb_common::NextHop {}
// SAFETY: the kernel's plain C struct (integers, arrays, unions of them); 64 bytes,
// aligned to 4.
unsafe impl Zeroable for aya_ebpf::bindings::bpf_fib_lookup {}

/// Zeroes `v` with one 32-bit store per word. A zeroed struct or array is otherwise
/// a `memset`, which on BPF is a call to a subprogram storing a byte per loop
/// iteration (a new flow made three); volatile stores are neither merged back into
/// one nor looped.
#[inline(always)]
pub fn zero<T: Zeroable>(v: &mut T) {
    const {
        assert!(core::mem::size_of::<T>().is_multiple_of(4) && core::mem::align_of::<T>() >= 4);
    }
    let words = v as *mut T as *mut u32;
    let mut i = 0;
    while i < core::mem::size_of::<T>() / 4 {
        // SAFETY: `v` is valid for writes of its whole size, a whole number of aligned
        // words (asserted above); all-zero is a valid T (Zeroable).
        unsafe { words.add(i).write_volatile(0) };
        i += 1;
    }
}

/// Writes an address as the bytes it has on the wire (its words are in network
/// order), one byte at a time: an unaligned store of a whole address is a memmove, a
/// call to a byte loop on BPF (see `zero`).
#[inline(always)]
pub fn put_addr(out: &mut [u8], a: &Addr) {
    let mut i = 0;
    while i < 4 {
        let b = a[i].to_ne_bytes();
        out[i * 4] = b[0];
        out[i * 4 + 1] = b[1];
        out[i * 4 + 2] = b[2];
        out[i * 4 + 3] = b[3];
        i += 1;
    }
}

/// Moves the frame's start by `delta` bytes (negative: room in front). Every pointer
/// into the frame must be derived again afterwards: `load`, `store` and `bytes_mut`
/// do, on each call.
#[inline(always)]
pub fn adjust_head(ctx: &XdpContext, delta: i32) -> Option<()> {
    // SAFETY: the helper only moves data/data_end; no pointer into the frame outlives
    // this call in our code (each access bounds-checks afresh).
    (unsafe { bpf_xdp_adjust_head(ctx.ctx, delta) } == 0).then_some(())
}

/// Moves the frame's end so that the frame is `len` bytes long. As `adjust_head`,
/// pointers into the frame are derived again afterwards.
#[inline(always)]
pub fn truncate(ctx: &XdpContext, len: usize) -> Option<()> {
    let delta = len as i32 - (ctx.data_end() - ctx.data()) as i32;
    // SAFETY: as adjust_head's.
    (unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) } == 0).then_some(())
}
