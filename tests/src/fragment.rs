//! IP fragmentation for test frames, as a sender's kernel does it, and reassembly of
//! what the program emits, so that `packet::decode` can check the whole datagram's
//! transport checksum after translation.

use anyhow::{bail, ensure, Context, Result};

const ETH: usize = 14;
const IPV6_HDR: usize = 40;
const FRAG_HDR: usize = 8;
const NEXT_FRAGMENT: u8 = 44;
const DEST_OPTS: u8 = 60;

/// The checksum of IPv4 header `h` (its checksum field, bytes 10-11, skipped).
pub fn ipv4_checksum(h: &[u8]) -> u16 {
    let mut sum = 0u32;
    for (i, c) in h.chunks(2).enumerate() {
        if i != 5 {
            sum += u16::from_be_bytes([c[0], c[1]]) as u32;
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn is_v4(frame: &[u8]) -> bool {
    frame[12..14] == [0x08, 0x00]
}

/// Splits a whole Ethernet + IP frame into fragments carrying at most `chunk` bytes of
/// the IP payload each (rounded down to a multiple of 8), with identification `id`.
/// IPv6 gets a fragment header right after the fixed header.
pub fn fragment(frame: &[u8], chunk: usize, id: u32) -> Vec<Vec<u8>> {
    fragment_behind(frame, chunk, id, &[])
}

/// As `fragment`, with IPv6 destination-options headers (`ext`, 8 bytes each; their
/// next-header byte is filled in here) before the fragment header.
pub fn fragment_behind(frame: &[u8], chunk: usize, id: u32, ext: &[[u8; 8]]) -> Vec<Vec<u8>> {
    let chunk = chunk / 8 * 8;
    assert!(chunk >= 8, "fragments carry at least 8 bytes");
    let mut out = Vec::new();
    if is_v4(frame) {
        let ihl = (frame[ETH] & 0x0f) as usize * 4;
        let payload = &frame[ETH + ihl..];
        let mut off = 0;
        while off < payload.len() {
            let end = (off + chunk).min(payload.len());
            let mut f = frame[..ETH + ihl].to_vec();
            f.extend_from_slice(&payload[off..end]);
            let tot = (ihl + end - off) as u16;
            f[ETH + 2..ETH + 4].copy_from_slice(&tot.to_be_bytes());
            f[ETH + 4..ETH + 6].copy_from_slice(&(id as u16).to_be_bytes());
            let more = if end < payload.len() { 0x2000 } else { 0 };
            f[ETH + 6..ETH + 8].copy_from_slice(&(more | (off / 8) as u16).to_be_bytes());
            let c = ipv4_checksum(&f[ETH..ETH + ihl]);
            f[ETH + 10..ETH + 12].copy_from_slice(&c.to_be_bytes());
            out.push(f);
            off = end;
        }
    } else {
        let next = frame[ETH + 6];
        let payload = &frame[ETH + IPV6_HDR..];
        let mut off = 0;
        while off < payload.len() {
            let end = (off + chunk).min(payload.len());
            let mut f = frame[..ETH + IPV6_HDR].to_vec();
            let mut chain = ext.to_vec();
            let n = chain.len();
            for (i, e) in chain.iter_mut().enumerate() {
                e[0] = if i + 1 < n { DEST_OPTS } else { NEXT_FRAGMENT };
            }
            f[ETH + 6] = if ext.is_empty() {
                NEXT_FRAGMENT
            } else {
                DEST_OPTS
            };
            for e in &chain {
                f.extend_from_slice(e);
            }
            let more = u16::from(end < payload.len());
            let word = ((off / 8) as u16) << 3 | more;
            f.push(next);
            f.push(0);
            f.extend_from_slice(&word.to_be_bytes());
            f.extend_from_slice(&id.to_be_bytes());
            f.extend_from_slice(&payload[off..end]);
            let plen = (f.len() - ETH - IPV6_HDR) as u16;
            f[ETH + 4..ETH + 6].copy_from_slice(&plen.to_be_bytes());
            out.push(f);
            off = end;
        }
    }
    out
}

/// Where a fragment's data sits: (offset in the datagram, more to come, data, the
/// inner next header for IPv6).
fn piece(f: &[u8]) -> Result<(usize, bool, Vec<u8>, u8)> {
    if is_v4(f) {
        let ihl = (f[ETH] & 0x0f) as usize * 4;
        let want = ipv4_checksum(&f[ETH..ETH + ihl]);
        let have = u16::from_be_bytes([f[ETH + 10], f[ETH + 11]]);
        ensure!(
            want == have,
            "bad IPv4 header checksum {have:#06x} in a fragment, want {want:#06x}"
        );
        let tot = u16::from_be_bytes([f[ETH + 2], f[ETH + 3]]) as usize;
        let word = u16::from_be_bytes([f[ETH + 6], f[ETH + 7]]);
        Ok((
            (word & 0x1fff) as usize * 8,
            word & 0x2000 != 0,
            f[ETH + ihl..ETH + tot].to_vec(),
            f[ETH + 9],
        ))
    } else {
        // Walk to the fragment header (destination options may come first).
        let mut next = f[ETH + 6];
        let mut off = ETH + IPV6_HDR;
        for _ in 0..4 {
            if next == NEXT_FRAGMENT {
                break;
            }
            next = f[off];
            off += (f[off + 1] as usize + 1) * 8;
        }
        ensure!(next == NEXT_FRAGMENT, "no fragment header");
        let word = u16::from_be_bytes([f[off + 2], f[off + 3]]);
        let plen = u16::from_be_bytes([f[ETH + 4], f[ETH + 5]]) as usize;
        Ok((
            (word >> 3) as usize * 8,
            word & 1 != 0,
            f[off + FRAG_HDR..ETH + IPV6_HDR + plen].to_vec(),
            f[off],
        ))
    }
}

/// The whole datagram from its fragments (in any order), as one frame with the first
/// fragment's Ethernet and IP header: fed to `packet::decode`, its transport checksum
/// is checked over the whole datagram. Every IPv4 fragment's own header checksum is
/// checked here. Gaps, overlaps and a missing last fragment are errors.
pub fn reassemble(frames: &[Vec<u8>]) -> Result<Vec<u8>> {
    let mut pieces = frames
        .iter()
        .map(|f| piece(f).map(|p| (p, f)))
        .collect::<Result<Vec<_>>>()?;
    pieces.sort_by_key(|((off, ..), _)| *off);
    let mut data = Vec::new();
    let mut last = false;
    for ((off, more, bytes, _), _) in &pieces {
        ensure!(
            *off == data.len(),
            "fragment at {off}, expected {}",
            data.len()
        );
        data.extend_from_slice(bytes);
        last = !more;
    }
    ensure!(last, "the last fragment is missing");
    let ((_, _, _, next), first) = pieces.first().context("no fragments")?;
    let mut out;
    if is_v4(first) {
        let ihl = (first[ETH] & 0x0f) as usize * 4;
        out = first[..ETH + ihl].to_vec();
        let tot = ihl + data.len();
        if tot > 65535 {
            bail!("reassembled datagram of {tot} bytes");
        }
        out[ETH + 2..ETH + 4].copy_from_slice(&(tot as u16).to_be_bytes());
        out[ETH + 6..ETH + 8].copy_from_slice(&[0, 0]);
        let c = ipv4_checksum(&out[ETH..ETH + ihl]);
        out[ETH + 10..ETH + 12].copy_from_slice(&c.to_be_bytes());
    } else {
        out = first[..ETH + IPV6_HDR].to_vec();
        out[ETH + 6] = *next;
        out[ETH + 4..ETH + 6].copy_from_slice(&(data.len() as u16).to_be_bytes());
    }
    out.extend_from_slice(&data);
    Ok(out)
}
