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

/// Where an rBlock lives: on this worker, or on a creditor (an index into the engine's peers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Holder {
    Local,
    Peer(u16),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRef {
    pub holder: Holder,
    /// The block's id in its holder's pool.
    pub block: u32,
}

/// The rBlocks of one request, in token order, wherever they live, and how many tokens they hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockTable {
    blocks: Vec<BlockRef>,
    tokens: usize,
}

impl BlockTable {
    pub fn blocks(&self) -> &[BlockRef] {
        &self.blocks
    }

    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Token slots already held but not yet filled.
    pub fn slack(&self, block_tokens: usize) -> usize {
        self.blocks.len() * block_tokens - self.tokens
    }

    /// Blocks to add so that `more` further tokens fit.
    pub fn blocks_needed(&self, more: usize, block_tokens: usize) -> usize {
        (self.tokens + more)
            .div_ceil(block_tokens)
            .saturating_sub(self.blocks.len())
    }

    pub fn extend_blocks(&mut self, holder: Holder, blocks: &[u32]) {
        self.blocks
            .extend(blocks.iter().map(|&block| BlockRef { holder, block }));
    }

    /// Points entry `index` at another block (a migration's commit); the tokens stay.
    pub fn replace_block(&mut self, index: usize, block: BlockRef) {
        self.blocks[index] = block;
    }

    /// Claims the next `n` token slots (block, offset within block), in order.
    pub fn push_tokens(&mut self, n: usize, block_tokens: usize) -> Vec<(BlockRef, u32)> {
        assert!(n <= self.slack(block_tokens), "block table overflow");
        let slots = (self.tokens..self.tokens + n)
            .map(|p| (self.blocks[p / block_tokens], (p % block_tokens) as u32))
            .collect();
        self.tokens += n;
        slots
    }

    /// The filled part of each block held by `holder`, as attention segments.
    pub fn segments(&self, holder: Holder, block_tokens: usize) -> Vec<KvSegment> {
        self.blocks
            .iter()
            .enumerate()
            .filter(|(_, b)| b.holder == holder)
            .map(|(i, b)| {
                let first = i * block_tokens;
                KvSegment {
                    block: b.block,
                    first_pos: first as u32,
                    tokens: self.tokens.saturating_sub(first).min(block_tokens) as u32,
                }
            })
            .filter(|s| s.tokens > 0)
            .collect()
    }

    /// Every holder other than this worker, each once, in first-use order.
    pub fn peers(&self) -> Vec<u16> {
        let mut peers = Vec::new();
        for b in &self.blocks {
            if let Holder::Peer(p) = b.holder
                && !peers.contains(&p)
            {
                peers.push(p);
            }
        }
        peers
    }

    /// Empties the table, handing back its blocks.
    pub fn take_blocks(&mut self) -> Vec<BlockRef> {
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
        t.extend_blocks(Holder::Local, &[7, 3]);
        let slots: Vec<(u32, u32)> = t
            .push_tokens(6, bt)
            .iter()
            .map(|(b, o)| (b.block, *o))
            .collect();
        assert_eq!(slots, vec![(7, 0), (7, 1), (7, 2), (7, 3), (3, 0), (3, 1)]);
        assert_eq!(t.blocks_needed(2, bt), 0);
        assert_eq!(t.blocks_needed(3, bt), 1);
        let segs = t.segments(Holder::Local, bt);
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
        assert_eq!(
            t.take_blocks().iter().map(|b| b.block).collect::<Vec<_>>(),
            vec![7, 3]
        );
        assert_eq!(t.tokens(), 0);
    }

    #[test]
    fn segments_split_by_holder_and_keep_positions() {
        let bt = 4;
        let mut t = BlockTable::default();
        t.extend_blocks(Holder::Local, &[0]);
        t.extend_blocks(Holder::Peer(2), &[5, 6]);
        t.extend_blocks(Holder::Local, &[1]);
        t.push_tokens(14, bt);
        assert_eq!(t.peers(), vec![2]);
        let remote = t.segments(Holder::Peer(2), bt);
        assert_eq!(
            remote
                .iter()
                .map(|s| (s.block, s.first_pos, s.tokens))
                .collect::<Vec<_>>(),
            vec![(5, 4, 4), (6, 8, 4)]
        );
        let local = t.segments(Holder::Local, bt);
        assert_eq!(
            local
                .iter()
                .map(|s| (s.block, s.first_pos, s.tokens))
                .collect::<Vec<_>>(),
            vec![(0, 0, 4), (1, 12, 2)]
        );
    }
}
