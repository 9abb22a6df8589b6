//! Every `unsafe` of the programs, each in a small helper: packet memory (bounds-checked
//! against `data_end` in the form the verifier recognises), map values in place,
//! per-CPU slots, and the kernel helpers that take raw pointers. The stages call these
//! and stay safe code.

use aya_ebpf::{
    bindings::bpf_fib_lookup,
    helpers::{
        bpf_csum_diff, bpf_fib_lookup as fib_lookup, bpf_ktime_get_coarse_ns, bpf_loop,
        bpf_probe_read_kernel, bpf_redirect, bpf_xdp_adjust_head, bpf_xdp_adjust_tail,
    },
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{Addr, FAMILY_V4};

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

/// Copies a header out of the packet. A `T` of 4-byte alignment (a header read as
/// `[u32; N]`, addresses as `[u32; 4]`) is read a word per instruction; anything else
/// byte by byte, which is how LLVM's BPF target copies a value it may not assume
/// aligned (a shift and an or per byte to put a word back together: 22 instructions
/// for the two addresses of an IPv4 header, 2 for them as words). Not 2-byte types:
/// with `u16` reads wide, LLVM left a register unset on a path the verifier then
/// refused (`R4 !read_ok`).
#[inline(always)]
pub fn load<T: Copy>(ctx: &XdpContext, offset: usize) -> Option<T> {
    let p = ptr_at::<T>(ctx, offset)?;
    // SAFETY: ptr_at checked that size_of::<T>() bytes at offset are inside the packet.
    // A word-aligned T is read as aligned, which a header in a frame does not promise
    // (the IPv4 addresses are 2 bytes past a word boundary): the read C XDP programs
    // make through `struct iphdr *`, which BPF allows. The verifier checks the
    // alignment of packet accesses only under BPF_F_STRICT_ALIGNMENT or on
    // architectures without efficient unaligned access (neither x86-64 nor arm64),
    // and the JITs emit the plain load.
    Some(unsafe {
        if core::mem::align_of::<T>() >= 4 {
            p.read()
        } else {
            core::ptr::read_unaligned(p)
        }
    })
}

/// Writes a header back into the packet (a word-aligned `T` a word at a time, as
/// `load` reads it).
#[inline(always)]
pub fn store<T: Copy>(ctx: &XdpContext, offset: usize, value: T) -> Option<()> {
    let p = ptr_at::<T>(ctx, offset)?;
    // SAFETY: as `load`'s; the frame is ours to modify during the call.
    unsafe {
        if core::mem::align_of::<T>() >= 4 {
            p.write(value);
        } else {
            core::ptr::write_unaligned(p, value);
        }
    }
    Some(())
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

/// A hash map, plain or LRU, whose values are used in place.
pub trait HashLookup<K, V> {
    fn lookup(&self, key: &K) -> Option<*mut V>;
}

impl<K, V> HashLookup<K, V> for HashMap<K, V> {
    #[inline(always)]
    fn lookup(&self, key: &K) -> Option<*mut V> {
        self.get_ptr_mut(key)
    }
}

impl<K, V> HashLookup<K, V> for LruHashMap<K, V> {
    #[inline(always)]
    fn lookup(&self, key: &K) -> Option<*mut V> {
        self.get_ptr_mut(key)
    }
}

/// The value under `key`, in the map itself: a copy would take stack, and writes must
/// reach the map.
#[inline(always)]
pub fn entry<'run, K, V>(map: &impl HashLookup<K, V>, key: &K) -> Option<&'run mut V> {
    // SAFETY: the kernel's pointer to the element stays valid until the program returns
    // (the element is freed after an RCU grace period). Other CPUs may write the same
    // element: the program writes whole fields, and every field read alone is usable.
    map.lookup(key).map(|p| unsafe { &mut *p })
}

/// A copy of the value under `key`, taken at once: an element the agent replaces
/// meanwhile is read either old or new, never reused for another key under us.
#[inline(always)]
pub fn copied<K, V: Copy>(map: &impl HashLookup<K, V>, key: &K) -> Option<V> {
    // SAFETY: as `entry`'s; the value is copied before anything else runs.
    map.lookup(key).map(|p| unsafe { *p })
}

/// Slot `index` of an array map, in place: the flow tables' buckets, which every CPU
/// reads and writes (flows.rs says how they agree).
#[inline(always)]
pub fn shared_slot<'run, T>(map: &Array<T>, index: u32) -> Option<&'run mut T> {
    // SAFETY: an array's slots live as long as the map, which outlives the program
    // run. Other CPUs write the same slot: the flow table reads its words only through
    // `read_once` and validates what it matched (flows.rs), and writes them only
    // through `copy_once` and `cas`.
    map.get_ptr_mut(index).map(|p| unsafe { &mut *p })
}

/// `v` read from memory now, not from a copy the compiler kept: another CPU may have
/// written it. Volatile accesses keep their order among themselves.
#[inline(always)]
pub fn read_once<T: Copy>(v: &T) -> T {
    // SAFETY: a valid reference, read whole.
    unsafe { core::ptr::read_volatile(v) }
}

/// `x` written to memory now, in program order with the other volatile accesses.
#[inline(always)]
pub fn write_once<T: Copy>(v: &mut T, x: T) {
    // SAFETY: a valid reference, written whole.
    unsafe { core::ptr::write_volatile(v, x) }
}

/// Copies `src` into `dst` word by word, each word written now and in order (as
/// volatile), without a copy of the whole on the stack. 32-bit words: the keys are
/// only 4-aligned, and an unaligned 64-bit access is eight byte accesses on BPF.
#[inline(always)]
pub fn copy_once<T: Copy>(dst: &mut T, src: &T) {
    const { assert!(core::mem::size_of::<T>().is_multiple_of(4) && core::mem::align_of::<T>() >= 4) };
    let words = core::mem::size_of::<T>() / 4;
    let (d, s) = (dst as *mut T as *mut u32, src as *const T as *const u32);
    let mut i = 0;
    while i < words {
        // SAFETY: both are valid for size_of::<T>() bytes and at least 4-aligned.
        unsafe { core::ptr::write_volatile(d.add(i), s.add(i).read()) };
        i += 1;
    }
}

/// Compare-and-swap (BPF_CMPXCHG, a full barrier): `v` becomes `new` if it is `old`.
/// 64-bit: the width the BPF target has at its default CPU version.
#[cfg(target_arch = "bpf")]
#[inline(always)]
pub fn cas(v: &mut u64, old: u64, new: u64) -> bool {
    use core::intrinsics::{atomic_cxchg, AtomicOrdering::SeqCst};
    // SAFETY: a valid, aligned u64.
    unsafe { atomic_cxchg::<u64, { SeqCst }, { SeqCst }>(v, old, new).1 }
}

/// The host build only type-checks the program (main.rs).
#[cfg(not(target_arch = "bpf"))]
pub fn cas(v: &mut u64, old: u64, new: u64) -> bool {
    use core::sync::atomic::{AtomicU64, Ordering::SeqCst};
    // SAFETY: a valid, aligned u64, accessed only atomically while the reference lives.
    unsafe { AtomicU64::from_ptr(v) }
        .compare_exchange(old, new, SeqCst, SeqCst)
        .is_ok()
}

/// This CPU's slot `index` of a per-CPU array: scratch memory, counters.
#[inline(always)]
pub fn this_cpu<'run, T>(map: &PerCpuArray<T>, index: u32) -> Option<&'run mut T> {
    // SAFETY: the program runs to completion on one CPU, and no other program run
    // touches this CPU's slot meanwhile. Stages that share a scratch slot each use
    // fields of their own (maps.rs says whose).
    map.get_ptr_mut(index).map(|p| unsafe { &mut *p })
}

/// A loop body for [`repeat`]: `$body(i, &mut state)` (i from 0, state of type `$T`)
/// returns true to stop. Defines `$name`, the function bpf_loop calls.
#[macro_export]
macro_rules! loop_body {
    ($name:ident, $T:ty, $body:path) => {
        extern "C" fn $name(i: u64, state: *mut core::ffi::c_void) -> i64 {
            // SAFETY: bpf_loop hands back the pointer `repeat` gave it: a `&mut $T`
            // that lives, unaliased, for the whole loop.
            let state = unsafe { &mut *(state as *mut $T) };
            $body(i as u32, state) as i64
        }
    };
}

/// Runs `body` (made by [`loop_body!`]) for i in 0..n, until it returns true, through
/// the kernel's bpf_loop: the verifier checks the body once, where a bounded loop is
/// walked once per iteration (the SNAT port probes cost it 300,000 instructions so).
#[inline(always)]
pub fn repeat<T>(n: u32, body: extern "C" fn(u64, *mut core::ffi::c_void) -> i64, state: &mut T) {
    // SAFETY: bpf_loop calls `body` with `state`'s address, which outlives the call;
    // `body` is a BPF function of this program (a BPF_PSEUDO_FUNC reference).
    unsafe {
        bpf_loop(
            n,
            body as *mut core::ffi::c_void,
            state as *mut T as *mut core::ffi::c_void,
            0,
        )
    };
}

/// The packet's one clock reading, in nanoseconds (coarse: the helper is not cheap).
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: no arguments, no memory touched.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// XDP_REDIRECT to `ifindex` (the helper's return value is the action).
#[inline(always)]
pub fn redirect(ifindex: u32) -> u32 {
    // SAFETY: no memory touched; a bad ifindex makes the redirect fail, not the call.
    unsafe { bpf_redirect(ifindex, 0) as u32 }
}

/// bpf_fib_lookup with the query in `p`; returns the helper's code, the answer in `p`.
#[inline(always)]
pub fn fib(ctx: &XdpContext, p: &mut bpf_fib_lookup) -> i64 {
    // SAFETY: ctx.ctx is the program's own context; `p` is a whole struct of the size
    // passed, which the helper reads and writes.
    unsafe {
        fib_lookup(
            ctx.ctx as *mut _,
            p,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    }
}

/// The MTU a FIB lookup answered with when it said "fragmentation needed".
#[inline(always)]
pub fn fib_mtu(p: &bpf_fib_lookup) -> u16 {
    // SAFETY: the union holds the MTU on that answer; any other time it is some u16.
    unsafe { p.__bindgen_anon_1.mtu_result }
}

/// The next hop a FIB lookup of `family` filled in (the gateway, or the destination).
#[inline(always)]
pub fn fib_next_hop(p: &bpf_fib_lookup, family: u8) -> Addr {
    if family == FAMILY_V4 {
        // SAFETY: the union field an IPv4 lookup writes; plain integers either way.
        [unsafe { p.__bindgen_anon_4.ipv4_dst }, 0, 0, 0]
    } else {
        // SAFETY: as above, for IPv6.
        unsafe { p.__bindgen_anon_4.ipv6_dst }
    }
}

/// The kernel's one's-complement sum (bpf_csum_diff) of `seed`, minus the bytes of
/// `from`, plus the bytes of `to`, unfolded (32 bits). Plain data of sizes that are
/// multiples of 4 (asserted), so the helper cannot fail; `from` may be `[u8; 0]`.
#[inline(always)]
pub fn csum_diff<F: Copy, T: Copy>(from: &F, to: &T, seed: u32) -> u32 {
    let (from_len, to_len) = (core::mem::size_of::<F>(), core::mem::size_of::<T>());
    const {
        assert!(core::mem::size_of::<F>().is_multiple_of(4));
        assert!(core::mem::size_of::<T>().is_multiple_of(4));
    }
    // The helper wants an empty `from` as null.
    let from_ptr = if from_len == 0 {
        core::ptr::null_mut()
    } else {
        from as *const F as *mut u32
    };
    // SAFETY: the helper only reads `from_len` bytes at `from` and `to_len` at `to`,
    // each the whole of its argument (packet memory too, bounds-checked by bytes_mut).
    let sum = unsafe {
        bpf_csum_diff(
            from_ptr,
            from_len as u32,
            to as *const T as *mut u32,
            to_len as u32,
            seed,
        )
    };
    sum as u32
}

/// Copies a `T` from kernel memory at `addr`; None for an address the kernel refuses.
#[inline(always)]
pub fn read_kernel<T>(addr: u64) -> Option<T> {
    if addr < 4096 {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel copies through the kernel's fault-safe accessor and
    // returns an error for a bad address; nothing is dereferenced directly.
    unsafe { bpf_probe_read_kernel(addr as *const T) }.ok()
}
