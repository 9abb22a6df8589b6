//! The machine's memory latency: what one read of a random cache line costs in a
//! working set of a given size, with 4 KiB pages and with 2 MiB (transparent huge)
//! pages. A new flow's bucket is such a line in the flow table (151 MB at the default
//! size), so this is the floor under a new flow's cost on this machine, measured
//! beside the per-packet figures (BENCHMARKS.md, "Another machine, a function per
//! family, and a new flow's floor").
//!
//! A pointer chase: each line holds the address of the next, in a random cyclic
//! order, so every read waits for the one before it, as a bucket read waits for the
//! flow's hash and the program waits for the bucket.

use anyhow::{bail, Result};
use std::time::Instant;

#[derive(serde::Serialize)]
pub struct Row {
    pub megabytes: usize,
    pub small_pages_ns: f64,
    pub huge_pages_ns: f64,
    /// Whether the kernel backed the whole huge-page working set with huge pages.
    pub huge_pages_given: bool,
}

const LINE: usize = 64;
const HUGE: usize = 2 << 20;

/// Each size twice per page size, in the order small, huge, huge, small, so that
/// neither comes first every time; the mean of the two.
pub fn measure(sizes_mb: &[usize], reads: usize) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for &mb in sizes_mb {
        let size = mb << 20;
        let (s1, _) = chase(size, false, reads)?;
        let (h1, given1) = chase(size, true, reads)?;
        let (h2, given2) = chase(size, true, reads)?;
        let (s2, _) = chase(size, false, reads)?;
        rows.push(Row {
            megabytes: mb,
            small_pages_ns: (s1 + s2) / 2.0,
            huge_pages_ns: (h1 + h2) / 2.0,
            huge_pages_given: given1 && given2,
        });
    }
    Ok(rows)
}

/// ns per dependent read of a random line in `size` bytes; whether huge pages backed
/// all of it (`huge` only).
fn chase(size: usize, huge: bool, reads: usize) -> Result<(f64, bool)> {
    // One huge page of slack, to start the working set on a huge-page boundary, and
    // the advice over whole huge pages (a 1 MB set lies inside one).
    let advised = size.div_ceil(HUGE) * HUGE;
    let len = advised + HUGE;
    // SAFETY: an anonymous private mapping of our own, unmapped below.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        bail!("mmap of {len} bytes: {}", std::io::Error::last_os_error());
    }
    let start = (base as usize).div_ceil(HUGE) * HUGE;
    let advice = if huge {
        libc::MADV_HUGEPAGE
    } else {
        libc::MADV_NOHUGEPAGE
    };
    // SAFETY: [start, start + advised) lies inside the mapping (start - base < HUGE).
    unsafe { libc::madvise(start as *mut libc::c_void, advised, advice) };
    // SAFETY: every line the walk touches lies in [start, start + size), inside the
    // mapping, which nothing else references and which is unmapped only after it.
    let ns = unsafe { walk(start as *mut u8, size / LINE, reads) };
    let given = huge && huge_kb_of(start) >= (advised >> 10) as u64;
    // SAFETY: the mapping made above, no longer referenced.
    unsafe { libc::munmap(base, len) };
    Ok((ns, given))
}

/// Links `lines` lines from `base` into one random cycle (xorshift, fixed seed), each
/// line's first word the address of the next, then times `reads` reads along it.
///
/// # Safety
/// `base` must be 64-byte aligned and valid for reads and writes of `lines * 64` bytes.
unsafe fn walk(base: *mut u8, lines: usize, reads: usize) -> f64 {
    let mut order: Vec<u32> = (0..lines as u32).collect();
    let mut s: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in (1..lines).rev() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        order.swap(i, (s % (i as u64 + 1)) as usize);
    }
    let line = |i: u32| base.wrapping_add(i as usize * LINE) as *mut *const u8;
    for i in 0..lines {
        let next = order[(i + 1) % lines];
        // SAFETY: both lines lie inside the region the caller vouched for.
        unsafe { line(order[i]).write(line(next) as *const u8) };
    }
    let mut p = line(order[0]) as *const u8;
    // Warm the page tables and caches as a running table would be: a lap, at most
    // `reads` long.
    for _ in 0..reads.min(lines) {
        // SAFETY: p is always a line of the cycle written above.
        p = unsafe { std::ptr::read_volatile(p as *const *const u8) };
    }
    let t = Instant::now();
    for _ in 0..reads {
        // SAFETY: as above.
        p = unsafe { std::ptr::read_volatile(p as *const *const u8) };
    }
    let ns = t.elapsed().as_nanos() as f64 / reads as f64;
    std::hint::black_box(p);
    ns
}

/// AnonHugePages (kB) of the mapping holding `addr`, from /proc/self/smaps.
fn huge_kb_of(addr: usize) -> u64 {
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return 0;
    };
    let mut inside = false;
    for l in smaps.lines() {
        let range = l
            .split_whitespace()
            .next()
            .and_then(|r| r.split_once('-'))
            .and_then(|(a, b)| {
                Some((
                    usize::from_str_radix(a, 16).ok()?,
                    usize::from_str_radix(b, 16).ok()?,
                ))
            });
        if let Some((a, b)) = range {
            inside = (a..b).contains(&addr);
        } else if inside && l.starts_with("AnonHugePages:") {
            return l
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
        }
    }
    0
}
