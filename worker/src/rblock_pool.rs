//! The local pool of rBlocks and the per-request block tables that index it.
//!
//! Pure bookkeeping: which block ids are free, which request holds which, and where a token of a
//! request lives. The memory itself belongs to the backend's KV cache.

use crate::backend::KvSegment;

/// A free list over `total` rBlocks. Allocation is all-or-nothing so a request never holds a
/// partial grant it cannot use.
#[derive(Debug)]
pub struct RBlockPool {
    free: Vec<u32>,
    in_use: Vec<bool>,
}

impl RBlockPool {
    pub fn new(total: usize) -> Self {
        // Reversed so that low ids are handed out first; it keeps dumps readable.
        Self {
            free: (0..total as u32).rev().collect(),
            in_use: vec![false; total],
        }
    }

    pub fn total(&self) -> usize {
        self.in_use.len()
    }

    pub fn free_count(&self) -> usize {
        self.free.len()
    }

    pub fn used_count(&self) -> usize {
        self.total() - self.free_count()
    }

    /// Takes `n` blocks, or none if fewer than `n` are free.
    pub fn alloc(&mut self, n: usize) -> Option<Vec<u32>> {
        if n > self.free.len() {
            return None;
        }
        let got = self.free.split_off(self.free.len() - n);
        for &b in &got {
            self.in_use[b as usize] = true;
        }
        Some(got)
    }

    /// Returns blocks to the pool. Freeing a block that is not in use is a bookkeeping bug.
    pub fn release(&mut self, blocks: &[u32]) {
        for &b in blocks {
            assert!(
                std::mem::replace(&mut self.in_use[b as usize], false),
                "rBlock {b} released twice"
            );
            self.free.push(b);
        }
    }
}

/// The rBlocks of one request, in token order, and how many tokens they hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockTable {
    blocks: Vec<u32>,
    tokens: usize,
}

impl BlockTable {
    pub fn blocks(&self) -> &[u32] {
        &self.blocks
    }

    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Blocks to add so that `more` further tokens fit.
    pub fn blocks_needed(&self, more: usize, block_tokens: usize) -> usize {
        (self.tokens + more)
            .div_ceil(block_tokens)
            .saturating_sub(self.blocks.len())
    }

    pub fn extend_blocks(&mut self, blocks: Vec<u32>) {
        self.blocks.extend(blocks);
    }

    /// Claims the next `n` token slots (block, offset within block), in order.
    pub fn push_tokens(&mut self, n: usize, block_tokens: usize) -> Vec<(u32, u32)> {
        let slots = (self.tokens..self.tokens + n)
            .map(|p| (self.blocks[p / block_tokens], (p % block_tokens) as u32))
            .collect();
        self.tokens += n;
        assert!(
            self.tokens <= self.blocks.len() * block_tokens,
            "block table overflow"
        );
        slots
    }

    /// The filled part of each block, as attention segments.
    pub fn segments(&self, block_tokens: usize) -> Vec<KvSegment> {
        self.blocks
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                let first = i * block_tokens;
                KvSegment {
                    block: b,
                    first_pos: first as u32,
                    tokens: self.tokens.saturating_sub(first).min(block_tokens) as u32,
                }
            })
            .filter(|s| s.tokens > 0)
            .collect()
    }

    /// Empties the table, handing back its blocks.
    pub fn take_blocks(&mut self) -> Vec<u32> {
        self.tokens = 0;
        std::mem::take(&mut self.blocks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_is_all_or_nothing_and_release_returns_blocks() {
        let mut pool = RBlockPool::new(4);
        let a = pool.alloc(3).unwrap();
        assert_eq!(pool.used_count(), 3);
        assert!(pool.alloc(2).is_none(), "only one block is free");
        assert_eq!(pool.used_count(), 3, "a refused alloc takes nothing");
        pool.release(&a);
        assert_eq!(pool.free_count(), 4);
        let mut all = pool.alloc(4).unwrap();
        all.sort();
        assert_eq!(all, vec![0, 1, 2, 3]);
    }

    #[test]
    #[should_panic(expected = "released twice")]
    fn double_release_is_caught() {
        let mut pool = RBlockPool::new(2);
        let a = pool.alloc(1).unwrap();
        pool.release(&a);
        pool.release(&a);
    }

    #[test]
    fn table_maps_tokens_to_slots_and_segments() {
        let bt = 4;
        let mut t = BlockTable::default();
        assert_eq!(t.blocks_needed(6, bt), 2);
        t.extend_blocks(vec![7, 3]);
        let slots = t.push_tokens(6, bt);
        assert_eq!(slots, vec![(7, 0), (7, 1), (7, 2), (7, 3), (3, 0), (3, 1)]);
        assert_eq!(t.blocks_needed(2, bt), 0);
        assert_eq!(t.blocks_needed(3, bt), 1);
        let segs = t.segments(bt);
        assert_eq!(
            segs,
            vec![
                KvSegment {
                    block: 7,
                    first_pos: 0,
                    tokens: 4
                },
                KvSegment {
                    block: 3,
                    first_pos: 4,
                    tokens: 2
                },
            ]
        );
        assert_eq!(t.take_blocks(), vec![7, 3]);
        assert_eq!(t.tokens(), 0);
    }
}
