//! The services' digests: what tells a changed service from an unchanged one.

use std::hash::{Hash, Hasher};

use super::Digest;

/// 128 bits of `value`, from two lanes of a multiply-rotate hash (`Lanes`): SipHash
/// fed field by field cost most of a one-backend change at 100,000 backends.
pub(super) fn digest(value: &impl Hash) -> Digest {
    let mut h = Lanes::default();
    value.hash(&mut h);
    h.digest()
}

/// Two 64-bit lanes, each updated per word by a xor, a multiplication by an odd
/// constant and a rotation: for a given word each step is a bijection of the lane, so
/// two inputs of the same shape that differ in one word (a backend's address, say)
/// never give the same digest; others collide by accident about once in 2^64 per
/// lane. Not a defence against inputs made to collide (nor was the keyless SipHash
/// before it): what is hashed comes from the operator and the API server.
#[derive(Default)]
struct Lanes {
    a: u64,
    b: u64,
    len: u64,
}

impl Lanes {
    #[inline]
    fn word(&mut self, w: u64) {
        self.a = (self.a ^ w)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(29);
        self.b = (self.b ^ w.rotate_left(32))
            .wrapping_mul(0xd6e8_feb8_6659_fd93)
            .rotate_left(37);
        self.len += 1;
    }

    pub(super) fn digest(mut self) -> Digest {
        let len = self.len;
        self.word(len);
        // A last mix, so the final words reach every bit.
        let fin = |mut x: u64| {
            x ^= x >> 33;
            x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
            x ^= x >> 33;
            x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
            x ^ (x >> 33)
        };
        (fin(self.a), fin(self.b))
    }
}

impl Hasher for Lanes {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.word(u64::from_le_bytes(w));
        }
        // Where the bytes end: "ab" + "c" is not "a" + "bc".
        self.word(bytes.len() as u64 | 1 << 63);
    }

    fn write_u8(&mut self, i: u8) {
        self.word(i as u64);
    }

    fn write_u16(&mut self, i: u16) {
        self.word(i as u64);
    }

    fn write_u32(&mut self, i: u32) {
        self.word(i as u64);
    }

    fn write_u64(&mut self, i: u64) {
        self.word(i);
    }

    fn write_usize(&mut self, i: usize) {
        self.word(i as u64);
    }

    fn finish(&self) -> u64 {
        unreachable!("digest() reads both lanes")
    }
}

pub(super) fn hash_of(value: &impl Hash) -> u64 {
    // Every DefaultHasher::new() hashes alike: the same input gives the same value for
    // the life of the process, which is all a comparison with the last apply needs.
    let mut h = std::hash::DefaultHasher::new();
    value.hash(&mut h);
    h.finish()
}
