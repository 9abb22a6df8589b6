//! Internet checksums (RFC 1071), as Katran's csum_helpers.h: sums of 16-bit words
//! folded to a checksum field, and incremental updates (RFC 1624) for rewritten words.
//!
//! Words are summed as they sit in memory (network byte order loaded natively): the
//! one's-complement sum is byte-order independent as long as every operand is loaded
//! the same way. Sums are kept in a u64 and folded once, at the end.

use aya_ebpf::helpers::bpf_csum_diff;
use lb_common::Addr;

/// A one's-complement sum folded to 16 bits. Four rounds bring any sum below 2^64
/// made of fewer than 2^32 words under 2^16.
#[inline(always)]
pub fn fold(mut s: u64) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// The checksum field for a one's-complement sum.
#[inline(always)]
pub fn finish(s: u64) -> u16 {
    !fold(s)
}

/// `s` plus the bytes `from..to` of `b` as 16-bit words (in memory order). Added to
/// `s` one word at a time, not summed apart and added at the end: a separate sum
/// keeps more loads live at once, and their spills cost stack the pipeline lacks.
#[inline(always)]
pub fn add_range<const N: usize>(mut s: u64, b: &[u8; N], from: usize, to: usize) -> u64 {
    let mut i = from;
    while i + 1 < to {
        s += u16::from_ne_bytes([b[i], b[i + 1]]) as u64;
        i += 2;
    }
    s
}

/// The sum of all `N` bytes as 16-bit words (in memory order).
#[inline(always)]
pub fn sum_words<const N: usize>(b: &[u8; N]) -> u64 {
    add_range(0, b, 0, N)
}

/// `seed` plus the `N` bytes at `b` (a multiple of 4), summed by the kernel
/// (bpf_csum_diff). For the long sums of the ICMP and neighbour answers: unrolled here,
/// their loads are all hoisted ahead of the adds, and their spills cost stack the
/// pipeline does not have.
#[inline(always)]
pub fn sum_bytes<const N: usize>(b: &[u8; N], seed: u32) -> u64 {
    const { assert!(N.is_multiple_of(4) && N <= 512) };
    let p = b.as_ptr() as *mut u32;
    // SAFETY: the helper only reads N bytes at `p`, all inside `b`; N is a multiple of
    // 4 (asserted above), so it cannot fail.
    (unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, p, N as u32, seed) }) as u32 as u64
}

/// The sum of an address's first `words` 32-bit words (1 for IPv4, 4 for IPv6).
#[inline(always)]
pub fn sum_addr(a: &Addr, words: usize) -> u64 {
    let mut s = 0u64;
    let mut i = 0;
    while i < 4 {
        if i < words {
            s += (a[i] & 0xffff) as u64 + (a[i] >> 16) as u64;
        }
        i += 1;
    }
    s
}

/// An IPv6 pseudo-header's sum without the addresses: the upper-layer length and the
/// next header, as the words they are on the wire.
#[inline(always)]
pub fn sum_pseudo_tail(len: u16, next_header: u8) -> u64 {
    u16::from_ne_bytes(len.to_be_bytes()) as u64
        + u16::from_ne_bytes((next_header as u16).to_be_bytes()) as u64
}

/// An incremental checksum update (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')) over
/// several replaced words, summed unfolded and folded once in `apply`. Folding after
/// each word made a chain of dependent adds per word: a profile of the established
/// path put an eighth of the program's own time on the folds.
#[derive(Clone, Copy, Default)]
pub struct Delta(u64);

impl Delta {
    #[inline(always)]
    pub fn new() -> Self {
        Delta(0)
    }

    /// The first `n` 32-bit words of `from` replaced by those of `to`.
    #[inline(always)]
    pub fn words(mut self, from: &[u32; 4], to: &[u32; 4], n: usize) -> Self {
        let mut i = 0;
        while i < 4 {
            if i < n {
                self.0 += (!from[i]) as u64 + to[i] as u64;
            }
            i += 1;
        }
        self
    }

    /// A 16-bit word replaced.
    #[inline(always)]
    pub fn half(mut self, from: u16, to: u16) -> Self {
        self.0 += (!from) as u64 + to as u64;
        self
    }

    /// The checksum `check` becomes. At most 20 words of under 2^32 each sum below
    /// 2^37, which fold's four rounds bring under 2^16.
    #[inline(always)]
    pub fn apply(self, check: u16) -> u16 {
        !fold(!check as u64 + self.0)
    }
}
