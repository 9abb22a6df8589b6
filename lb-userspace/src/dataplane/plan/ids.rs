//! Id allocation for services and backends within one plan.

use std::collections::BTreeSet;

/// Hands out the lowest free ids below `limit`. Ids are only taken during one plan
/// (removals come after), so a cursor that never moves back finds each in turn:
/// allocating n ids is O(n log n), not the O(n²) of searching from 0 each time.
pub(super) struct IdAllocator {
    used: BTreeSet<u32>,
    next: u32,
    limit: u32,
}

impl IdAllocator {
    pub(super) fn new(used: BTreeSet<u32>, limit: u32) -> Self {
        Self {
            used,
            next: 0,
            limit,
        }
    }

    pub(super) fn alloc(&mut self) -> Option<u32> {
        self.alloc_where(|_| true)
    }

    /// The lowest id from the cursor on that is neither taken here nor refused by
    /// `free` (which knows what is taken elsewhere).
    pub(super) fn alloc_where(&mut self, free: impl Fn(u32) -> bool) -> Option<u32> {
        let id = (self.next..self.limit).find(|i| !self.used.contains(i) && free(*i))?;
        self.used.insert(id);
        self.next = id + 1;
        Some(id)
    }
}
