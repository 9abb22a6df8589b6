//! The machine's memory latency: what one read of a random cache line costs in a
//! working set of a given size, with 4 KiB pages and with 2 MiB (transparent huge)
//! pages. A new flow's bucket is such a line in the flow table (151 MB at the default
//! size), so this is the floor under a new flow's cost on this machine, measured
//! beside the per-packet figures (BENCHMARKS.md, "Where a new flow's time goes").
//!
//! A pointer chase: each line holds the address of the next, in a random cyclic
//! order, so every read waits for the one before it, as a bucket read waits for the
//! flow's hash and the program waits for the bucket.

use anyhow::{bail, Result};
use std::time::Instant;

pub struct Row {
    pub megabytes: usize,
    pub small_pages_ns: f64,
    pub huge_pages_ns: f64,
    /// Whether the kernel gave the huge-page run huge pages (AnonHugePages > 0).
    pub huge_pages_given: bool,
}

const LINE: usize = 64;
const HUGE: usize = 2 << 20;

pub fn measure(sizes_mb: &[usize], reads: usize) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for &mb in sizes_mb {
        let (small, _) = chase(mb << 20, false, reads)?;
        let (huge, given) = chase(mb << 20, true, reads)?;
        rows.push(Row {
            megabytes: mb,
            small_pages_ns: small,
            huge_pages_ns: huge,
            huge_pages_given: given,
        });
    }
    Ok(rows)
}

/// ns per dependent read of a random line in `size` bytes; whether huge pages backed it.
fn chase(size: usize, huge: bool, reads: usize) -> Result<(f64, bool)> {
    let len = size + HUGE;
    // SAFETY: an anonymous private mapping of our own, unmapped below; no other
    // reference to it exists.
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
    // SAFETY: [start, start + size) lies inside the mapping; the slice is the only
    // view of it and ends before the munmap.
    let result = unsafe {
        libc::madvise(start as *mut libc::c_void, size, advice);
        let lines = std::slice::from_raw_parts_mut(start as *mut usize, size / 8);
        walk(lines, start, size / LINE, reads)
    };
    let given = huge && anon_huge_kb() > 0;
    // SAFETY: the mapping made above, no longer referenced.
    unsafe { libc::munmap(base, len) };
    Ok((result, given))
}

/// Links every line to the next of a random cycle (xorshift, fixed seed), then times
/// `reads` reads along it.
fn walk(words: &mut [usize], start: usize, n: usize, reads: usize) -> f64 {
    let per_line = LINE / 8;
    let mut order: Vec<u32> = (0..n as u32).collect();
    let mut s: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in (1..n).rev() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        order.swap(i, (s % (i as u64 + 1)) as usize);
    }
    for i in 0..n {
        let next = order[(i + 1) % n] as usize;
        words[order[i] as usize * per_line] = start + next * LINE;
    }
    let mut p = start + order[0] as usize * LINE;
    // Warm the page tables and caches as a running table would be: a lap, at most
    // `reads` long.
    for _ in 0..reads.min(n) {
        // SAFETY: p is always a line start inside `words` (the cycle's own links).
        p = unsafe { std::ptr::read_volatile(p as *const usize) };
    }
    let t = Instant::now();
    for _ in 0..reads {
        // SAFETY: as above.
        p = unsafe { std::ptr::read_volatile(p as *const usize) };
    }
    let ns = t.elapsed().as_nanos() as f64 / reads as f64;
    std::hint::black_box(p);
    ns
}

fn anon_huge_kb() -> u64 {
    std::fs::read_to_string("/proc/self/smaps_rollup")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("AnonHugePages:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}
