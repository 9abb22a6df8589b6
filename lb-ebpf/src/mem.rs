//! The only place that touches packet memory through raw pointers. Every access is
//! bounds-checked against `data_end` in the form the verifier recognises.

use aya_ebpf::programs::XdpContext;

/// A pointer to a `T` at `offset` bytes into the packet, if the whole `T` is inside it.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
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
