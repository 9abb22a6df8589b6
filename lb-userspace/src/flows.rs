//! The flow tables (XLB_CONNTRACK, XLB_REVERSE_NAT) as the agent sees them: mapped
//! into its memory a window at a time (the maps are BPF_F_MMAPABLE arrays of buckets),
//! read without a syscall per entry, and written by the same protocol the datapath follows
//! (lb-common's flows.rs): a way is read between two equal reads of its word, and
//! removed by a compare-and-swap of its word, which loses to any write it races with.
//! The agent never takes a bucket's insert lock: a process can be descheduled while
//! holding it, which would leave the datapath unable to insert there.

use std::{
    marker::PhantomData,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::Path,
    ptr::NonNull,
    sync::{
        atomic::{fence, AtomicU64, Ordering},
        Mutex,
    },
};

use anyhow::{bail, Context, Result};
use aya::maps::{MapData, MapInfo};
use lb_common::{
    bucket_of, flow_hash, flow_tag, freed_word, next_word, word_busy, word_tag, ConnValue,
    FlowBucket, FlowKey, ReverseNat, FLOW_TABLE_FORMAT, FLOW_WAYS,
};
use tracing::warn;

/// Buckets mapped at a time. Mapping a BPF array maps all its pages at once, and they
/// count in the process's RSS while mapped: the default tables are 144 MiB each, which
/// a whole mapping added to the agent's RSS for every sweep and scrape. A window of
/// 2,048 buckets is 1.1 MiB, and starts on a page (a multiple of 64 buckets of 576
/// bytes is a multiple of the page for pages up to 64 KiB).
const WINDOW_BUCKETS: u32 = 2048;

/// One of the two tables, read through a window that moves over it.
pub struct FlowTable<V> {
    fd: OwnedFd,
    buckets: u32,
    window: Mutex<Option<Window>>,
    _value: PhantomData<V>,
}

/// A mapping of buckets `first..first + count`.
struct Window {
    base: NonNull<u8>,
    first: u32,
    count: u32,
    len: usize,
}

// SAFETY: the mapping is shared memory that every access treats as such (atomics for
// the words, volatile copies for keys and values); the window is only used under the
// table's mutex.
unsafe impl Send for Window {}

pub type Conntrack = FlowTable<ConnValue>;
pub type ReverseTable = FlowTable<ReverseNat>;

/// A way as it was read: where it is, and the word it was read under.
#[derive(Clone, Copy, Debug)]
pub struct Entry<V> {
    pub key: FlowKey,
    pub value: V,
    pub bucket: u32,
    pub way: usize,
    word: u64,
}

impl Window {
    fn map(fd: &OwnedFd, first: u32, count: u32, bucket_size: usize) -> Result<Self> {
        let len = (count as usize * bucket_size).next_multiple_of(page_size());
        let offset = first as usize * bucket_size;
        // SAFETY: a shared mapping of the map's values from a page-aligned offset inside
        // them, which BPF_F_MMAPABLE arrays allow; the kernel keeps the map alive while
        // it is mapped.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mapping the flow table");
        }
        Ok(Self {
            base: NonNull::new(p.cast()).context("mmap returned null")?,
            first,
            count,
            len,
        })
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        // SAFETY: the mapping made in Window::map, of this length.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// The word of `way` in the bucket at `b`.
///
/// # Safety
/// `b` points to a bucket inside a live mapping.
unsafe fn word<'a, V>(b: *mut FlowBucket<V>, way: usize) -> &'a AtomicU64 {
    // SAFETY: an aligned u64 inside the mapping, which every side accesses atomically.
    unsafe { AtomicU64::from_ptr(std::ptr::addr_of_mut!((*b).words[way])) }
}

/// The table's format word, in bucket 0 at `b` (lb_common::FLOW_TABLE_FORMAT).
///
/// # Safety
/// `b` points to bucket 0 inside a live mapping.
unsafe fn format_word<'a, V>(b: *mut FlowBucket<V>) -> &'a AtomicU64 {
    // SAFETY: an aligned u64 inside the mapping, which only the agent writes,
    // atomically; the datapath never touches it.
    unsafe { AtomicU64::from_ptr(std::ptr::addr_of_mut!((*b).format)) }
}

/// The way, if it held a whole flow while it was read.
///
/// # Safety
/// `b` points to a bucket inside a live mapping, or to a copy of one.
unsafe fn read_way<V: Copy>(b: *mut FlowBucket<V>, bucket: u32, way: usize) -> Option<Entry<V>> {
    // SAFETY: the caller's.
    let word = unsafe { word(b, way) };
    let w = word.load(Ordering::Acquire);
    if word_tag(w) == 0 || word_busy(w) {
        return None;
    }
    // SAFETY: in bounds; read with volatile copies, as another CPU may write it.
    let (key, value) = unsafe {
        let p = std::ptr::addr_of!((*b).ways[way]);
        (
            std::ptr::read_volatile(std::ptr::addr_of!((*p).key)),
            std::ptr::read_volatile(std::ptr::addr_of!((*p).value)),
        )
    };
    fence(Ordering::Acquire);
    (word.load(Ordering::Relaxed) == w).then_some(Entry {
        key,
        value,
        bucket,
        way,
        word: w,
    })
}

impl<V: Copy> FlowTable<V> {
    /// Opens the table `map` (an array of FlowBucket<V>).
    pub fn new(map: &MapData) -> Result<Self> {
        let info = map.info()?;
        Self::from_fd(map.fd().as_fd(), &info)
    }

    /// Opens the table pinned at `path`.
    pub fn from_pin(path: &Path) -> Result<Self> {
        let map = MapData::from_pin(path)
            .with_context(|| format!("opening the flow table {}", path.display()))?;
        Self::new(&map)
    }

    fn from_fd(fd: std::os::fd::BorrowedFd<'_>, info: &MapInfo) -> Result<Self> {
        let size = std::mem::size_of::<FlowBucket<V>>();
        if info.value_size() as usize != size {
            bail!(
                "the flow table's buckets are {} bytes, this agent's {size}: another layout",
                info.value_size()
            );
        }
        let table = Self {
            fd: fd
                .try_clone_to_owned()
                .context("duplicating the flow table's fd")?,
            buckets: info.max_entries(),
            window: Mutex::new(None),
            _value: PhantomData,
        };
        // Mapped once now, so that a table that cannot be mapped fails here.
        table.with_bucket(0, |_| ())?;
        Ok(table)
    }

    pub fn buckets(&self) -> u32 {
        self.buckets
    }

    /// Whether the table's flows are bucketed by this version's flow hash: it was
    /// stamped (`stamp`) by an agent of this version or later. An earlier table's
    /// flows are carried over, not adopted (dataplane/carry.rs).
    pub fn current_format(&self) -> Result<bool> {
        // SAFETY: p is bucket 0 inside the mapping, held for this closure.
        self.with_bucket(0, |p| {
            unsafe { format_word(p) }.load(Ordering::Acquire) == FLOW_TABLE_FORMAT
        })
    }

    /// Marks the table as bucketed by this version's flow hash (`current_format`).
    pub fn stamp(&self) -> Result<()> {
        // SAFETY: p is bucket 0 inside the mapping, held for this closure.
        self.with_bucket(0, |p| {
            unsafe { format_word(p) }.store(FLOW_TABLE_FORMAT, Ordering::Release)
        })
    }

    /// How many flows the table holds at most.
    pub fn capacity(&self) -> usize {
        self.buckets as usize * FLOW_WAYS
    }

    /// Runs `f` on bucket `i`, mapping its window first unless it is the one mapped.
    fn with_bucket<R>(&self, i: u32, f: impl FnOnce(*mut FlowBucket<V>) -> R) -> Result<R> {
        debug_assert!(i < self.buckets);
        let mut window = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let inside = |w: &Window| (w.first..w.first + w.count).contains(&i);
        if !window.as_ref().is_some_and(inside) {
            *window = None;
            let first = i / WINDOW_BUCKETS * WINDOW_BUCKETS;
            let count = WINDOW_BUCKETS.min(self.buckets - first);
            let size = std::mem::size_of::<FlowBucket<V>>();
            *window = Some(Window::map(&self.fd, first, count, size)?);
        }
        let w = window.as_ref().expect("mapped above");
        // SAFETY: bucket i is inside this window's mapping, which lives while the lock
        // is held.
        let p = unsafe {
            w.base
                .as_ptr()
                .cast::<FlowBucket<V>>()
                .add((i - w.first) as usize)
        };
        Ok(f(p))
    }

    /// `with_bucket`, where a failure to map (not expected of a table that mapped once)
    /// is logged and reads as an empty bucket.
    fn at<R: Default>(&self, i: u32, f: impl FnOnce(*mut FlowBucket<V>) -> R) -> R {
        self.with_bucket(i, f).unwrap_or_else(|e| {
            warn!("reading the flow table: {e:#}");
            R::default()
        })
    }

    /// Runs `f` on each bucket of window `n` (buckets n × WINDOW_BUCKETS onwards), under
    /// one lock and one mapping.
    fn each_in_window(&self, n: u32, mut f: impl FnMut(u32, *mut FlowBucket<V>)) {
        let first = n * WINDOW_BUCKETS;
        let last = (first + WINDOW_BUCKETS).min(self.buckets);
        self.at(first, |p| {
            for b in first..last {
                // SAFETY: the window that holds `first` holds every bucket up to `last`
                // (windows start at multiples of WINDOW_BUCKETS), mapped while the
                // lock is held.
                f(b, unsafe { p.add((b - first) as usize) });
            }
        });
    }

    fn windows(&self) -> u32 {
        self.buckets.div_ceil(WINDOW_BUCKETS)
    }

    /// Every flow the table holds, each as it was when read; read a window at a time.
    pub fn entries(&self) -> impl Iterator<Item = Entry<V>> + '_ {
        (0..self.windows()).flat_map(move |n| {
            let mut out = Vec::new();
            self.each_in_window(n, |b, p| {
                for w in 0..FLOW_WAYS {
                    // SAFETY: p is bucket b inside the mapping, held for this call.
                    if let Some(e) = unsafe { read_way(p, b, w) } {
                        out.push(e);
                    }
                }
            });
            out
        })
    }

    /// How many ways hold a flow (expired ones included), from the header lines only.
    pub fn occupied(&self) -> usize {
        let mut n = 0;
        for window in 0..self.windows() {
            self.each_in_window(window, |_, p| {
                // SAFETY: p is a bucket inside the mapping, held for this call.
                n += (0..FLOW_WAYS)
                    .filter(|&w| word_tag(unsafe { word(p, w) }.load(Ordering::Relaxed)) != 0)
                    .count();
            });
        }
        n
    }

    /// The flow `key`, as the datapath finds it. Its bucket is copied by a map lookup
    /// (one syscall), not mapped: lookups land anywhere in the table, and mapping a
    /// window for each was slower.
    pub fn get(&self, key: &FlowKey) -> Option<Entry<V>> {
        let hash = flow_hash(key, false);
        let b = bucket_of(hash, self.buckets);
        let mut copy = std::mem::MaybeUninit::<FlowBucket<V>>::uninit();
        if let Err(e) = lookup(&self.fd, b, copy.as_mut_ptr().cast()) {
            warn!("reading the flow table: {e:#}");
            return None;
        }
        (0..FLOW_WAYS)
            // SAFETY: the copy the kernel wrote whole; read as a bucket, as it was.
            .filter_map(|w| unsafe { read_way(copy.as_mut_ptr(), b, w) })
            .find(|e| word_tag(e.word) == flow_tag(hash) && e.key == *key)
    }

    /// Removes `e` if its way still holds what was read. Returns whether it did.
    pub fn remove(&self, e: &Entry<V>) -> bool {
        self.at(e.bucket, |p| {
            // SAFETY: p is e's bucket inside the mapping, held for this closure.
            unsafe { word(p, e.way) }
                .compare_exchange(
                    e.word,
                    freed_word(e.word),
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_ok()
        })
    }

    /// Writes flow `key` into an empty way of its bucket, or over its own way, without
    /// the insert lock: for tests and benchmarks that set the table up while no packet
    /// runs. Returns false if the bucket is full of other flows.
    pub fn insert(&self, key: &FlowKey, value: &V) -> bool {
        let hash = flow_hash(key, false);
        let b = bucket_of(hash, self.buckets);
        self.at(b, |p| {
            // SAFETY: p is bucket b inside the mapping, held for this closure.
            let way = (0..FLOW_WAYS)
                .find(|&w| unsafe { read_way(p, b, w) }.is_some_and(|e| e.key == *key))
                .or_else(|| {
                    (0..FLOW_WAYS)
                        .find(|&w| word_tag(unsafe { word(p, w) }.load(Ordering::Relaxed)) == 0)
                });
            let Some(way) = way else {
                return false;
            };
            // SAFETY: as above.
            let word = unsafe { word(p, way) };
            let w = word.load(Ordering::Acquire) & !1;
            let tag = flow_tag(hash);
            word.store(next_word(w, tag), Ordering::Release);
            // SAFETY: in bounds; the way is marked busy, so readers skip it.
            unsafe {
                let p = std::ptr::addr_of_mut!((*p).ways[way]);
                std::ptr::write_volatile(std::ptr::addr_of_mut!((*p).key), *key);
                std::ptr::write_volatile(std::ptr::addr_of_mut!((*p).value), *value);
            }
            word.store(next_word(next_word(w, tag), tag), Ordering::Release);
            true
        })
    }
}

/// BPF_MAP_LOOKUP_ELEM of array index `index` into `value` (the map's value size).
fn lookup(fd: &OwnedFd, index: u32, value: *mut u8) -> Result<()> {
    #[repr(C)]
    struct Attr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let attr = Attr {
        map_fd: fd.as_raw_fd() as u32,
        _pad: 0,
        key: std::ptr::addr_of!(index) as u64,
        value: value as u64,
        flags: 0,
    };
    const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
    // SAFETY: the bpf syscall reads `attr` (of the size given) and the key, and writes
    // the value size's bytes at `value`, which the caller provides.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_ELEM,
            std::ptr::addr_of!(attr),
            std::mem::size_of::<Attr>() as u32,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error()).context("looking up a flow table bucket");
    }
    Ok(())
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).max(4096) as usize
}
