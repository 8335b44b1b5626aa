//! Continuous batching over the rBlock pool: which requests run in the next step, with how many
//! tokens each, and who gives up blocks when the pool runs dry. Pure logic, no model, no I/O.
//!
//! Each step mixes decode tokens of running requests with prefill chunks of new ones, up to a
//! token budget. Running requests go first, oldest first; if one needs a block and none is free,
//! the newest running request is preempted: its blocks are freed and it goes back to the front of
//! the queue, to be recomputed from its token ids later (vLLM's recompute policy).

use std::collections::{HashMap, VecDeque};
use std::ops::Range;

use crate::backend::AttnSeq;
use crate::rblock_pool::{BlockTable, RBlockPool};

pub type SeqId = u64;

#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    pub block_tokens: usize,
    pub max_num_seqs: usize,
    pub max_batched_tokens: usize,
}

#[derive(Debug)]
struct Seq {
    /// Prompt and generated tokens so far.
    tokens: Vec<u32>,
    table: BlockTable,
}

/// The part of one request that runs in a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepItem {
    pub seq: SeqId,
    /// Positions fed this step.
    pub positions: Range<usize>,
    /// Whether the step reaches the end of the request's tokens, so a next token is sampled.
    pub samples: bool,
}

/// A step's plan, flattened the way the model wants it.
#[derive(Debug, Default)]
pub struct Step {
    pub items: Vec<StepItem>,
    pub tokens: Vec<u32>,
    pub positions: Vec<u32>,
    pub slots: Vec<(u32, u32)>,
    pub attn: Vec<AttnSeq>,
    /// Rows whose logits are sampled, in `items` order (one per item that samples).
    pub logit_rows: Vec<usize>,
    /// Requests sent back to the queue to free blocks in this step.
    pub preempted: Vec<SeqId>,
}

pub struct Scheduler {
    cfg: SchedulerConfig,
    pool: RBlockPool,
    seqs: HashMap<SeqId, Seq>,
    waiting: VecDeque<SeqId>,
    /// Oldest first.
    running: Vec<SeqId>,
    preemptions: u64,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig, total_blocks: usize) -> Self {
        Self {
            cfg,
            pool: RBlockPool::new(total_blocks),
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            preemptions: 0,
        }
    }

    /// Tokens the pool can hold for one request: the hard limit on prompt plus output.
    pub fn capacity_tokens(&self) -> usize {
        self.pool.total() * self.cfg.block_tokens
    }

    pub fn add(&mut self, id: SeqId, prompt: Vec<u32>) {
        assert!(
            !prompt.is_empty(),
            "empty prompts are refused before the scheduler"
        );
        self.seqs.insert(
            id,
            Seq {
                tokens: prompt,
                table: BlockTable::default(),
            },
        );
        self.waiting.push_back(id);
    }

    /// Appends a sampled token to a running request.
    pub fn append_token(&mut self, id: SeqId, token: u32) {
        self.seqs
            .get_mut(&id)
            .expect("known request")
            .tokens
            .push(token);
    }

    /// Forgets a request (finished or cancelled) and frees its blocks.
    pub fn remove(&mut self, id: SeqId) {
        if let Some(mut s) = self.seqs.remove(&id) {
            self.pool.release(&s.table.take_blocks());
            self.running.retain(|&r| r != id);
            self.waiting.retain(|&w| w != id);
        }
    }

    pub fn running(&self) -> usize {
        self.running.len()
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn blocks_total(&self) -> usize {
        self.pool.total()
    }

    pub fn blocks_used(&self) -> usize {
        self.pool.used_count()
    }

    pub fn preemptions(&self) -> u64 {
        self.preemptions
    }

    pub fn is_idle(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Plans the next step and claims the KV slots it writes.
    pub fn schedule(&mut self) -> Step {
        let mut step = Step::default();
        let mut budget = self.cfg.max_batched_tokens;
        let mut planned: Vec<(SeqId, usize)> = Vec::new();

        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let want = self.pending(id).min(budget);
            if self.reserve(id, want, &mut step.preempted) {
                planned.push((id, want));
                budget -= want;
                i += 1;
            }
            // Otherwise `id` itself was preempted; the entry at `i` is now the next one.
        }
        while budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            let Some(&id) = self.waiting.front() else {
                break;
            };
            let want = self.pending(id).min(budget);
            let seq = &self.seqs[&id];
            let need = seq.table.blocks_needed(want, self.cfg.block_tokens);
            let Some(blocks) = self.pool.alloc(need) else {
                break;
            };
            self.seqs.get_mut(&id).unwrap().table.extend_blocks(blocks);
            self.waiting.pop_front();
            self.running.push(id);
            planned.push((id, want));
            budget -= want;
        }

        for (id, n) in planned {
            self.plan_item(&mut step, id, n);
        }
        step
    }

    /// Tokens of a request whose KV is not in the cache yet.
    fn pending(&self, id: SeqId) -> usize {
        let s = &self.seqs[&id];
        s.tokens.len() - s.table.tokens()
    }

    /// Makes room for `n` more tokens of running request `id`, preempting the newest running
    /// requests as needed. Returns false if `id` itself had to be preempted.
    fn reserve(&mut self, id: SeqId, n: usize, preempted: &mut Vec<SeqId>) -> bool {
        loop {
            let need = self.seqs[&id].table.blocks_needed(n, self.cfg.block_tokens);
            if let Some(blocks) = self.pool.alloc(need) {
                self.seqs.get_mut(&id).unwrap().table.extend_blocks(blocks);
                return true;
            }
            let victim = *self.running.last().expect("id is running");
            self.preempt(victim);
            preempted.push(victim);
            if victim == id {
                return false;
            }
        }
    }

    fn preempt(&mut self, id: SeqId) {
        let s = self.seqs.get_mut(&id).unwrap();
        self.pool.release(&s.table.take_blocks());
        self.running.retain(|&r| r != id);
        self.waiting.push_front(id);
        self.preemptions += 1;
    }

    fn plan_item(&mut self, step: &mut Step, id: SeqId, n: usize) {
        let bt = self.cfg.block_tokens;
        let s = self.seqs.get_mut(&id).unwrap();
        let start = s.table.tokens();
        let first_row = step.tokens.len();
        step.slots.extend(s.table.push_tokens(n, bt));
        step.tokens.extend_from_slice(&s.tokens[start..start + n]);
        step.positions.extend(start as u32..(start + n) as u32);
        step.attn.push(AttnSeq {
            rows: first_row..first_row + n,
            first_row_pos: start as u32,
            segments: s.table.segments(bt),
        });
        let samples = start + n == s.tokens.len();
        if samples {
            step.logit_rows.push(first_row + n - 1);
        }
        step.items.push(StepItem {
            seq: id,
            positions: start..start + n,
            samples,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(blocks: usize, max_tokens: usize) -> Scheduler {
        Scheduler::new(
            SchedulerConfig {
                block_tokens: 4,
                max_num_seqs: 8,
                max_batched_tokens: max_tokens,
            },
            blocks,
        )
    }

    /// Runs steps, appending token 1 to every sampling request, until `id` has `len` tokens.
    fn drive(s: &mut Scheduler, steps: usize) -> Vec<Step> {
        (0..steps)
            .map(|_| {
                let step = s.schedule();
                for it in step.items.iter().filter(|it| it.samples) {
                    s.append_token(it.seq, 1);
                }
                step
            })
            .collect()
    }

    #[test]
    fn long_prompts_prefill_in_chunks_then_decode_one_token_a_step() {
        let mut s = sched(16, 8);
        s.add(1, (0..19).collect());
        let steps = drive(&mut s, 4);
        let fed: Vec<Range<usize>> = steps
            .iter()
            .map(|st| st.items[0].positions.clone())
            .collect();
        assert_eq!(fed, vec![0..8, 8..16, 16..19, 19..20]);
        assert_eq!(
            steps
                .iter()
                .map(|st| st.items[0].samples)
                .collect::<Vec<_>>(),
            vec![false, false, true, true]
        );
        assert_eq!(steps[2].logit_rows, vec![2]);
        assert_eq!(s.blocks_used(), 5, "20 tokens in blocks of 4");
    }

    #[test]
    fn decodes_and_prefills_share_a_step() {
        let mut s = sched(16, 8);
        s.add(1, vec![5, 6, 7]);
        drive(&mut s, 1);
        s.add(2, (0..10).collect());
        let step = s.schedule();
        assert_eq!(step.items.len(), 2);
        assert_eq!(step.items[0].positions, 3..4, "the decode goes first");
        assert_eq!(
            step.items[1].positions,
            0..7,
            "the prefill takes the rest of the budget"
        );
        assert_eq!(step.attn[1].rows, 1..8);
        assert_eq!(step.attn[1].first_row_pos, 0);
    }

    #[test]
    fn a_full_pool_preempts_the_newest_and_recomputes_it_later() {
        let mut s = sched(4, 64);
        s.add(1, (0..8).collect());
        s.add(2, (0..7).collect());
        drive(&mut s, 1);
        assert_eq!(s.blocks_used(), 4);
        // Request 1 needs a third block at its next token: request 2 must yield.
        let steps = drive(&mut s, 1);
        assert_eq!(steps[0].preempted, vec![2]);
        assert_eq!(s.running(), 1);
        assert_eq!(s.waiting(), 1);
        assert_eq!(s.preemptions(), 1);
        s.remove(1);
        let step = s.schedule();
        assert_eq!(step.items[0].seq, 2);
        assert_eq!(
            step.items[0].positions,
            0..8,
            "prompt and its sampled token are recomputed"
        );
    }

    #[test]
    fn removal_frees_everything_and_blocks_are_never_shared() {
        let mut s = sched(32, 16);
        for id in 0..6 {
            s.add(id, (0..(3 + id as u32 * 5)).collect());
        }
        for _ in 0..20 {
            let step = s.schedule();
            let mut owned: Vec<u32> = s
                .seqs
                .values()
                .flat_map(|q| q.table.blocks().to_vec())
                .collect();
            let n = owned.len();
            owned.sort();
            owned.dedup();
            assert_eq!(owned.len(), n, "a block has two owners");
            assert_eq!(n, s.blocks_used());
            for it in step.items.iter().filter(|it| it.samples) {
                s.append_token(it.seq, 1);
            }
        }
        for id in 0..6 {
            s.remove(id);
        }
        assert_eq!(s.blocks_used(), 0);
        assert!(s.is_idle());
    }
}
