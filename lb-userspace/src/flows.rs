//! The flow tables (XLB_CONNTRACK, XLB_REVERSE_NAT) as the agent sees them: mapped
//! into its memory (the maps are BPF_F_MMAPABLE arrays of buckets), read without a
//! syscall per entry, and written by the same protocol the datapath follows
//! (lb-common's flows.rs): a way is read between two equal reads of its word, and
//! removed by a compare-and-swap of its word, which loses to any write it races with.
//! The agent never takes a bucket's insert lock: a process can be descheduled while
//! holding it, which would leave the datapath unable to insert there.

use std::{
    os::fd::{AsFd, AsRawFd},
    path::Path,
    ptr::NonNull,
    sync::atomic::{fence, AtomicU64, Ordering},
};

use anyhow::{bail, Context, Result};
use aya::maps::{MapData, MapInfo};
use lb_common::{
    bucket_of, flow_hash, flow_tag, freed_word, next_word, word_busy, word_tag, ConnValue,
    FlowBucket, FlowKey, ReverseNat, FLOW_WAYS,
};

/// One of the two tables, mapped.
pub struct FlowTable<V> {
    base: NonNull<FlowBucket<V>>,
    buckets: u32,
    len: usize,
    // The mapping holds its own reference to the map; the fd only had to live for mmap.
}

// SAFETY: the mapping is shared memory that every access below treats as such
// (atomics for the words, volatile copies for keys and values).
unsafe impl<V> Send for FlowTable<V> {}
unsafe impl<V> Sync for FlowTable<V> {}

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

impl<V: Copy> FlowTable<V> {
    /// Maps the table `map` (an array of FlowBucket<V>).
    pub fn new(map: &MapData) -> Result<Self> {
        let info = map.info()?;
        Self::from_fd(map.fd().as_fd(), &info)
    }

    /// Maps the table pinned at `path`.
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
        let buckets = info.max_entries();
        let len = (buckets as usize * size).next_multiple_of(page_size());
        // SAFETY: a shared mapping of the map's values, which BPF_F_MMAPABLE arrays
        // allow from offset 0; the kernel keeps the map alive while it is mapped.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mapping the flow table");
        }
        Ok(Self {
            base: NonNull::new(p.cast()).context("mmap returned null")?,
            buckets,
            len,
        })
    }

    pub fn buckets(&self) -> u32 {
        self.buckets
    }

    /// How many flows the table holds at most.
    pub fn capacity(&self) -> usize {
        self.buckets as usize * FLOW_WAYS
    }

    fn bucket(&self, i: u32) -> *mut FlowBucket<V> {
        debug_assert!(i < self.buckets);
        // SAFETY: in bounds of the mapping.
        unsafe { self.base.as_ptr().add(i as usize) }
    }

    fn word(&self, bucket: u32, way: usize) -> &AtomicU64 {
        // SAFETY: an aligned u64 inside the mapping, which every side accesses atomically.
        unsafe { AtomicU64::from_ptr(std::ptr::addr_of_mut!((*self.bucket(bucket)).words[way])) }
    }

    /// The way, if it held a whole flow while it was read.
    fn read(&self, bucket: u32, way: usize) -> Option<Entry<V>> {
        let w = self.word(bucket, way).load(Ordering::Acquire);
        if word_tag(w) == 0 || word_busy(w) {
            return None;
        }
        // SAFETY: in bounds; read with volatile copies, as another CPU may write it.
        let (key, value) = unsafe {
            let p = std::ptr::addr_of!((*self.bucket(bucket)).ways[way]);
            (
                std::ptr::read_volatile(std::ptr::addr_of!((*p).key)),
                std::ptr::read_volatile(std::ptr::addr_of!((*p).value)),
            )
        };
        fence(Ordering::Acquire);
        (self.word(bucket, way).load(Ordering::Relaxed) == w).then_some(Entry {
            key,
            value,
            bucket,
            way,
            word: w,
        })
    }

    /// Every flow the table holds, each as it was when read.
    pub fn entries(&self) -> impl Iterator<Item = Entry<V>> + '_ {
        (0..self.buckets).flat_map(move |b| (0..FLOW_WAYS).filter_map(move |w| self.read(b, w)))
    }

    /// How many ways hold a flow (expired ones included), from the header lines only.
    pub fn occupied(&self) -> usize {
        (0..self.buckets)
            .map(|b| {
                (0..FLOW_WAYS)
                    .filter(|&w| word_tag(self.word(b, w).load(Ordering::Relaxed)) != 0)
                    .count()
            })
            .sum()
    }

    /// The flow `key`, as the datapath finds it.
    pub fn get(&self, key: &FlowKey) -> Option<Entry<V>> {
        let hash = flow_hash(key, false);
        let b = bucket_of(hash, self.buckets);
        (0..FLOW_WAYS)
            .filter_map(|w| self.read(b, w))
            .find(|e| word_tag(e.word) == flow_tag(hash) && e.key == *key)
    }

    /// Removes `e` if its way still holds what was read. Returns whether it did.
    pub fn remove(&self, e: &Entry<V>) -> bool {
        self.word(e.bucket, e.way)
            .compare_exchange(
                e.word,
                freed_word(e.word),
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_ok()
    }

    /// Writes flow `key` into an empty way of its bucket, or over its own way, without
    /// the insert lock: for tests and benchmarks that set the table up while no packet
    /// runs. Returns false if the bucket is full of other flows.
    pub fn insert(&self, key: &FlowKey, value: &V) -> bool {
        let hash = flow_hash(key, false);
        let b = bucket_of(hash, self.buckets);
        let way = (0..FLOW_WAYS)
            .find(|&w| self.read(b, w).is_some_and(|e| e.key == *key))
            .or_else(|| {
                (0..FLOW_WAYS).find(|&w| word_tag(self.word(b, w).load(Ordering::Relaxed)) == 0)
            });
        let Some(way) = way else {
            return false;
        };
        let word = self.word(b, way);
        let w = word.load(Ordering::Acquire) & !1;
        let tag = flow_tag(hash);
        word.store(next_word(w, tag), Ordering::Release);
        // SAFETY: in bounds; the way is marked busy, so readers skip it.
        unsafe {
            let p = std::ptr::addr_of_mut!((*self.bucket(b)).ways[way]);
            std::ptr::write_volatile(std::ptr::addr_of_mut!((*p).key), *key);
            std::ptr::write_volatile(std::ptr::addr_of_mut!((*p).value), *value);
        }
        word.store(next_word(next_word(w, tag), tag), Ordering::Release);
        true
    }
}

impl<V> Drop for FlowTable<V> {
    fn drop(&mut self) {
        // SAFETY: the mapping made in from_fd, of this length.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).max(4096) as usize
}
