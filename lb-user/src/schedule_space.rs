//! Which stretches of the datapath's `SCHEDULE` array are in use, and by whom.
//!
//! Services get blocks of it (two regions each, see [`crate::services`]) from a free list
//! (first fit) or past the highest block given out so far. A block given back by a reload is
//! not reused by that same reload: a packet that looked up the removed service just before
//! may still be reading its table, so the block waits in quarantine until the next reload
//! starts, long after any such packet is gone (an XDP run takes microseconds).

/// A stretch of `SCHEDULE`: entries `offset..offset + len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Block {
    pub offset: u32,
    pub len: u32,
}

impl Block {
    fn end(self) -> u32 {
        self.offset + self.len
    }
}

/// The allocation state of a `SCHEDULE` array of `size` entries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduleSpace {
    size: u32,
    /// Everything from here on has never been given out.
    next: u32,
    /// Blocks given back and reusable, by offset, none adjacent to another.
    free: Vec<Block>,
    /// Blocks given back during the current reload: free once the next one starts.
    quarantined: Vec<Block>,
}

impl ScheduleSpace {
    pub fn new(size: u32) -> Self {
        Self {
            size,
            next: 0,
            free: Vec::new(),
            quarantined: Vec::new(),
        }
    }

    /// Entries in the whole array.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// The longest block [`Self::allocate`] could give now.
    pub fn largest_free(&self) -> u32 {
        let tail = self.size - self.next;
        self.free.iter().map(|block| block.len).fold(tail, u32::max)
    }

    /// A block of `len` entries: the first free one that fits, else fresh space at the end.
    pub fn allocate(&mut self, len: u32) -> Option<Block> {
        if let Some(index) = self.free.iter().position(|block| block.len >= len) {
            let found = self.free[index];
            if found.len == len {
                self.free.remove(index);
            } else {
                self.free[index] = Block {
                    offset: found.offset + len,
                    len: found.len - len,
                };
            }
            return Some(Block {
                offset: found.offset,
                len,
            });
        }
        if self.size - self.next < len {
            return None;
        }
        let block = Block {
            offset: self.next,
            len,
        };
        self.next += len;
        Some(block)
    }

    /// Gives `block` back; it is reusable after [`Self::end_quarantine`].
    pub fn release(&mut self, block: Block) {
        if !self.quarantined.contains(&block) {
            self.quarantined.push(block);
        }
    }

    /// Whether `block` waits in quarantine.
    pub fn is_quarantined(&self, block: Block) -> bool {
        self.quarantined.contains(&block)
    }

    /// Takes `block` out of quarantine: it is in use again (a reload rolled back).
    pub fn reclaim(&mut self, block: Block) {
        self.quarantined.retain(|held| *held != block);
    }

    /// Makes the blocks released before now reusable: called as a reload starts.
    pub fn end_quarantine(&mut self) {
        self.free.append(&mut self.quarantined);
        self.free.sort();
        let mut merged: Vec<Block> = Vec::with_capacity(self.free.len());
        for block in self.free.drain(..) {
            match merged.last_mut() {
                Some(last) if last.end() == block.offset => last.len += block.len,
                _ => merged.push(block),
            }
        }
        // A free block at the very end goes back to the never-used tail.
        if merged.last().is_some_and(|last| last.end() == self.next) {
            if let Some(last) = merged.pop() {
                self.next = last.offset;
            }
        }
        self.free = merged;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(offset: u32, len: u32) -> Block {
        Block { offset, len }
    }

    #[test]
    fn released_blocks_wait_one_reload_then_are_reused_first_fit() {
        let mut space = ScheduleSpace::new(100);
        let a = space.allocate(30).expect("fits");
        let b = space.allocate(30).expect("fits");
        let c = space.allocate(30).expect("fits");
        assert_eq!((a, b, c), (block(0, 30), block(30, 30), block(60, 30)));
        assert_eq!(space.allocate(11), None, "10 left");

        space.release(a);
        assert!(space.is_quarantined(a));
        assert_eq!(
            space.allocate(20),
            None,
            "not within the reload that released it"
        );
        space.end_quarantine();
        assert_eq!(space.largest_free(), 30);
        assert_eq!(space.allocate(20), Some(block(0, 20)), "first fit");
        assert_eq!(space.allocate(10), Some(block(20, 10)), "the rest of it");
        assert_eq!(space.allocate(10), Some(block(90, 10)), "then the tail");
        assert_eq!(space.largest_free(), 0);
    }

    #[test]
    fn adjacent_free_blocks_merge_and_the_last_returns_to_the_tail() {
        let mut space = ScheduleSpace::new(100);
        let blocks: Vec<Block> = (0..4).map(|_| space.allocate(20).expect("fits")).collect();
        space.release(blocks[1]);
        space.release(blocks[2]);
        space.end_quarantine();
        assert_eq!(
            space.allocate(40),
            Some(block(20, 40)),
            "20..40 and 40..60 merged"
        );
        space.release(blocks[3]);
        space.end_quarantine();
        assert_eq!(space.largest_free(), 40, "60..100 is the tail again");
        assert_eq!(space.allocate(40), Some(block(60, 40)));
    }

    #[test]
    fn a_reclaimed_block_is_not_freed() {
        let mut space = ScheduleSpace::new(50);
        let a = space.allocate(50).expect("fits");
        space.release(a);
        space.reclaim(a);
        space.end_quarantine();
        assert_eq!(space.allocate(1), None);
    }
}
