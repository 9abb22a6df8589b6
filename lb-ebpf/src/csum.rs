//! Internet checksums (RFC 1071), as Katran's csum_helpers.h: sums of 16-bit words
//! folded to a checksum field, and incremental updates (RFC 1624) for rewritten words.
//!
//! Words are summed as they sit in memory (network byte order loaded natively): the
//! one's-complement sum is byte-order independent as long as every operand is loaded
//! the same way. Sums are kept in a u64 and folded once, at the end.

use crate::mem;

/// A one's-complement sum folded to 16 bits (four rounds: enough for any u64).
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

/// The sum of all `N` bytes as 16-bit words (in memory order), unrolled: for the
/// 20-byte IPv4 headers of the forward path, where a helper call would cost more.
#[inline(always)]
pub fn sum_words<const N: usize>(b: &[u8; N]) -> u64 {
    let mut s = 0u64;
    let mut i = 0;
    while i + 1 < N {
        s += u16::from_ne_bytes([b[i], b[i + 1]]) as u64;
        i += 2;
    }
    s
}

/// The sum of the `N` bytes at `b` (a multiple of 4), by the kernel (bpf_csum_diff):
/// for the longer sums of the ICMP and neighbour answers. Unrolled, their loads are
/// all hoisted ahead of the adds, and the spills take stack the pipeline lacks.
#[inline(always)]
pub fn sum_bytes<const N: usize>(b: &[u8; N]) -> u64 {
    mem::csum_diff(&[0u8; 0], b, 0) as u64
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
