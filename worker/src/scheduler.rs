//! Continuous batching over the rBlock pool: which requests run in the next step, with how many
//! tokens each, and who gives up blocks when the pool runs dry. Pure logic, no model, no I/O.
//!
//! Each step mixes decode tokens of running requests with prefill chunks of new ones, up to a
//! token budget. Running requests go first, oldest first. One that needs a block takes a local
//! one if any is free; if none is, the newest running
//! request is preempted: its blocks are freed and it goes back to the front of the queue, to be
//! recomputed from its token ids later (vLLM's recompute policy). New requests start on local
//! blocks, except long ones: a request that outgrows its home, or that needs more than the
//! long-request share of it, borrows the rest before it starts (see [`early_borrow`]).

use std::collections::{HashMap, VecDeque};
use std::ops::Range;

use crate::backend::{AttnSeq, KvSegment, NO_SLOT};
use crate::model::llama::StepInput;
use crate::rblock_pool::{BlockTable, Holder};
use crate::rmanager::RManager;

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
    /// Prompt plus the most tokens it may generate.
    need_tokens: usize,
    table: BlockTable,
    /// Blocks borrowed for a request that has not started yet, by peer.
    reserved: Vec<(u16, Vec<u32>)>,
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
    /// Attention over blocks held by creditors.
    pub remote: Vec<RemotePart>,
    /// Requests sent back to the queue to free blocks in this step.
    pub preempted: Vec<SeqId>,
}

impl Step {
    /// The model's view of this step.
    pub fn input(&self) -> StepInput<'_> {
        StepInput {
            tokens: &self.tokens,
            positions: &self.positions,
            slots: &self.slots,
            seqs: &self.attn,
            logit_rows: &self.logit_rows,
            remote: &self.remote,
        }
    }
}

/// One request's attention over the blocks one creditor holds for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemotePart {
    pub peer: u16,
    pub seq: SeqId,
    /// Index into `Step::attn`: the rows and positions of the queries.
    pub attn: usize,
    /// The creditor's blocks, in its own ids.
    pub segments: Vec<KvSegment>,
    /// Rows whose new K and V the creditor stores: (row, block, offset).
    pub appends: Vec<(usize, u32, u32)>,
}

pub struct Scheduler {
    cfg: SchedulerConfig,
    /// Share of the local pool a long request keeps here (1.0: no early borrowing).
    long_home_share: f64,
    /// Benchmarks only: a prompt's K/V counts as written, all but its last token.
    unfilled_prompts: bool,
    rm: RManager,
    seqs: HashMap<SeqId, Seq>,
    waiting: VecDeque<SeqId>,
    /// Oldest first.
    running: Vec<SeqId>,
    preemptions: u64,
    /// Requests that gave back blocks held by peers, for the engine to tell those peers.
    released: Vec<(SeqId, u16)>,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig, rm: RManager) -> Self {
        Self {
            cfg,
            long_home_share: 1.0,
            unfilled_prompts: false,
            rm,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            preemptions: 0,
            released: Vec::new(),
        }
    }

    /// Long requests keep only `share` of the local pool here and borrow the rest before they
    /// start, so the home keeps room for its batch; 1.0 (the default) turns this off.
    pub fn with_long_home_share(mut self, share: f64) -> Self {
        self.long_home_share = share.clamp(0.0, 1.0);
        self
    }

    /// For benchmarks of decode at contexts too long to prefill in time: a request starts with
    /// its prompt taken as already in its blocks (whatever they hold), all but the last token,
    /// which the first step runs. Its output means nothing; its speed is decode's at that length.
    pub fn with_unfilled_prompts(mut self, on: bool) -> Self {
        self.unfilled_prompts = on;
        self
    }

    pub fn block_tokens(&self) -> usize {
        self.cfg.block_tokens
    }

    pub fn rmanager(&self) -> &RManager {
        &self.rm
    }

    pub fn rmanager_mut(&mut self) -> &mut RManager {
        &mut self.rm
    }

    /// Peers that hold blocks of requests that ended or were preempted since the last call.
    pub fn take_released(&mut self) -> Vec<(SeqId, u16)> {
        std::mem::take(&mut self.released)
    }

    /// Blocks each request holds, by holder, for the gManager's ledger.
    pub fn placements(&self) -> Vec<(SeqId, Holder, usize)> {
        let mut out = Vec::new();
        for (&id, s) in &self.seqs {
            let mut by: Vec<(Holder, usize)> = Vec::new();
            for b in s.table.blocks() {
                match by.iter_mut().find(|(h, _)| *h == b.holder) {
                    Some((_, n)) => *n += 1,
                    None => by.push((b.holder, 1)),
                }
            }
            out.extend(by.into_iter().map(|(h, n)| (id, h, n)));
        }
        out
    }

    /// Blocks this worker's requests hold on peers.
    pub fn borrowed_blocks(&self) -> usize {
        self.seqs
            .values()
            .flat_map(|s| s.table.blocks())
            .filter(|b| b.holder != Holder::Local)
            .count()
    }

    /// Tokens the local pool can hold for one request.
    pub fn capacity_tokens(&self) -> usize {
        self.rm.total() * self.cfg.block_tokens
    }

    pub fn add(&mut self, id: SeqId, prompt: Vec<u32>, max_new_tokens: usize) {
        assert!(
            !prompt.is_empty(),
            "empty prompts are refused before the scheduler"
        );
        self.seqs.insert(
            id,
            Seq {
                need_tokens: prompt.len() + max_new_tokens,
                tokens: prompt,
                table: BlockTable::default(),
                reserved: Vec::new(),
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
            for (peer, blocks) in s.reserved.drain(..) {
                s.table.extend_blocks(Holder::Peer(peer), &blocks);
            }
            self.release(id, &mut s.table);
            self.running.retain(|&r| r != id);
            self.waiting.retain(|&w| w != id);
        }
    }

    fn release(&mut self, id: SeqId, table: &mut BlockTable) {
        let peers = table.peers();
        let local: Vec<u32> = table
            .take_blocks()
            .iter()
            .filter(|b| b.holder == Holder::Local)
            .map(|b| b.block)
            .collect();
        self.rm.release_local(&local);
        self.released.extend(peers.into_iter().map(|p| (id, p)));
    }

    pub fn running(&self) -> usize {
        self.running.len()
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn blocks_total(&self) -> usize {
        self.rm.total()
    }

    /// Local blocks in use, by this worker's requests and by loans.
    pub fn blocks_used(&self) -> usize {
        self.rm.total() - self.rm.free()
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
            // Nothing to run until its next token is in: an empty item would still claim a
            // sample (of the row before it).
            if want == 0 {
                i += 1;
                continue;
            }
            let fit = self.grow(id, want);
            if fit > 0 {
                planned.push((id, fit));
                budget -= fit;
                i += 1;
                continue;
            }
            let victim = *self.running.last().expect("id is running");
            self.preempt(victim);
            step.preempted.push(victim);
            // If `id` itself yielded, the entry at `i` is now the next request.
        }
        while budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            let Some(&id) = self.waiting.front() else {
                break;
            };
            let bt = self.cfg.block_tokens;
            let pending = self.pending(id);
            let skip = if self.unfilled_prompts {
                pending.saturating_sub(1)
            } else {
                0
            };
            let want = (pending - skip).min(budget);
            let seq = &self.seqs[&id];
            // A request the local pool cannot carry to its end, or one that borrowed early,
            // starts only with its whole need reserved, here and on creditors, so requests that
            // grow never wait on each other across workers. Its local blocks come first in its
            // table. One that fits here needs its first chunk, and grows as in vLLM.
            let need = if self.outgrows_home(id) || !seq.reserved.is_empty() {
                let borrowed: usize = seq.reserved.iter().map(|(_, b)| b.len()).sum();
                seq.need_tokens.div_ceil(bt).saturating_sub(borrowed)
            } else {
                seq.table.blocks_needed(skip + want, bt)
            };
            if need > self.rm.free() {
                break;
            }
            let local = self.rm.alloc_local(need);
            let seq = self.seqs.get_mut(&id).unwrap();
            seq.table.extend_blocks(Holder::Local, &local);
            for (peer, blocks) in seq.reserved.drain(..) {
                seq.table.extend_blocks(Holder::Peer(peer), &blocks);
            }
            seq.table.push_tokens(skip, bt);
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

    /// Makes room for up to `want` more tokens of running request `id` with free local blocks.
    /// Returns how many tokens now fit (borrowed blocks already in the table count too).
    fn grow(&mut self, id: SeqId, want: usize) -> usize {
        let bt = self.cfg.block_tokens;
        let need = self.seqs[&id].table.blocks_needed(want, bt);
        let local = self.rm.alloc_local(need);
        let table = &mut self.seqs.get_mut(&id).unwrap().table;
        table.extend_blocks(Holder::Local, &local);
        want.min(table.slack(bt))
    }

    /// Whether a request needs more than this worker's whole pool.
    fn outgrows_home(&self, id: SeqId) -> bool {
        self.seqs[&id].need_tokens > self.capacity_tokens()
    }

    /// The next request to start, if it outgrows this worker and lacks blocks, or if it is long
    /// ([`early_borrow`]): the blocks to borrow for it, all or nothing, before scheduling. A
    /// long request whose borrowing fails holds nothing and starts here as any other.
    pub fn borrow_want(&self) -> Option<(SeqId, usize)> {
        let &id = self.waiting.front()?;
        if self.running.len() >= self.cfg.max_num_seqs {
            return None;
        }
        let seq = &self.seqs[&id];
        let need = seq.need_tokens.div_ceil(self.cfg.block_tokens);
        let held: usize = seq.reserved.iter().map(|(_, b)| b.len()).sum();
        let free = self.rm.free();
        let short = if self.outgrows_home(id) {
            need.saturating_sub(held + free)
        } else {
            early_borrow(need, held, free, self.rm.total(), self.long_home_share)
        };
        (short > 0).then_some((id, short))
    }

    /// Adds blocks that `peer` reserved for waiting request `id`; they join its table, after its
    /// local blocks, when it starts.
    pub fn add_borrowed(&mut self, id: SeqId, peer: u16, blocks: &[u32]) {
        let seq = self.seqs.get_mut(&id).expect("known request");
        seq.reserved.push((peer, blocks.to_vec()));
    }

    /// Drops the blocks reserved for waiting request `id`; returns the peers that hold them.
    pub fn unreserve(&mut self, id: SeqId) -> Vec<u16> {
        let seq = self.seqs.get_mut(&id).expect("known request");
        seq.reserved.drain(..).map(|(peer, _)| peer).collect()
    }

    fn preempt(&mut self, id: SeqId) {
        self.requeue(id);
        self.preemptions += 1;
    }

    /// Frees a running request's blocks and puts it at the front of the queue, to be
    /// recomputed from its token ids.
    fn requeue(&mut self, id: SeqId) {
        let mut table = std::mem::take(&mut self.seqs.get_mut(&id).unwrap().table);
        self.release(id, &mut table);
        self.running.retain(|&r| r != id);
        self.waiting.push_front(id);
    }

    /// Forgets what a step that failed half-way wrote: its requests run the same positions
    /// again, into the blocks they already hold.
    pub fn rollback(&mut self, items: &[StepItem]) {
        let bt = self.cfg.block_tokens;
        for it in items {
            if let Some(s) = self.seqs.get_mut(&it.seq) {
                for b in s.table.take_blocks() {
                    s.table.extend_blocks(b.holder, &[b.block]);
                }
                s.table.push_tokens(it.positions.start, bt);
            }
        }
    }

    /// Gives up every block held on `peers` (lost, or taking their blocks back): requests with
    /// K/V there go back to the front of the queue to be recomputed from their token ids, and
    /// waiting requests drop their reservations and borrow again. Returns the requests and
    /// the filled blocks that will be recomputed.
    pub fn evict_holding(&mut self, peers: &[u16]) -> (Vec<SeqId>, usize) {
        let bt = self.cfg.block_tokens;
        let mut evicted = Vec::new();
        let mut blocks = 0;
        // Newest first, so that the oldest ends up at the front of the queue.
        for id in self.running.clone().into_iter().rev() {
            let table = &self.seqs[&id].table;
            if table.peers().iter().any(|p| peers.contains(p)) {
                blocks += table.tokens().div_ceil(bt);
                self.requeue(id);
                evicted.push(id);
            }
        }
        for id in self.drop_reservations_on(peers) {
            if !evicted.contains(&id) {
                evicted.push(id);
            }
        }
        (evicted, blocks)
    }

    /// Waiting requests with blocks reserved on `peers` drop all their reservations (all or
    /// nothing) and borrow again; returns them.
    pub fn drop_reservations_on(&mut self, peers: &[u16]) -> Vec<SeqId> {
        let mut dropped = Vec::new();
        for &id in &self.waiting {
            let seq = self.seqs.get_mut(&id).expect("waiting requests are known");
            if seq.reserved.iter().any(|(p, _)| peers.contains(p)) {
                self.released
                    .extend(seq.reserved.drain(..).map(|(p, _)| (id, p)));
                dropped.push(id);
            }
        }
        dropped
    }

    /// The block table of a running request.
    pub fn running_table(&self, id: SeqId) -> Option<&BlockTable> {
        self.running.contains(&id).then(|| &self.seqs[&id].table)
    }

    /// The block table of a running request, for a migration's commit.
    pub fn running_table_mut(&mut self, id: SeqId) -> Option<&mut BlockTable> {
        if !self.running.contains(&id) {
            return None;
        }
        self.seqs.get_mut(&id).map(|s| &mut s.table)
    }

    /// Running requests with blocks on `peer`, oldest first.
    pub fn running_on(&self, peer: u16) -> Vec<SeqId> {
        self.running
            .iter()
            .copied()
            .filter(|id| self.seqs[id].table.peers().contains(&peer))
            .collect()
    }

    /// Sends one running request back to the queue, to be recomputed from its token ids;
    /// returns its filled blocks.
    pub fn evict(&mut self, id: SeqId) -> usize {
        if !self.running.contains(&id) {
            return 0;
        }
        let blocks = self.seqs[&id]
            .table
            .tokens()
            .div_ceil(self.cfg.block_tokens);
        self.requeue(id);
        blocks
    }

    fn plan_item(&mut self, step: &mut Step, id: SeqId, n: usize) {
        let bt = self.cfg.block_tokens;
        let s = self.seqs.get_mut(&id).unwrap();
        let start = s.table.tokens();
        let first_row = step.tokens.len();
        let attn = step.attn.len();
        let mut appends: Vec<(u16, usize, u32, u32)> = Vec::new();
        for (i, (b, off)) in s.table.push_tokens(n, bt).into_iter().enumerate() {
            match b.holder {
                Holder::Local => step.slots.push((b.block, off)),
                Holder::Peer(p) => {
                    step.slots.push(NO_SLOT);
                    appends.push((p, first_row + i, b.block, off));
                }
            }
        }
        step.tokens.extend_from_slice(&s.tokens[start..start + n]);
        step.positions.extend(start as u32..(start + n) as u32);
        step.attn.push(AttnSeq {
            rows: first_row..first_row + n,
            first_row_pos: start as u32,
            segments: s.table.segments(Holder::Local, bt),
        });
        for peer in s.table.peers() {
            let segments = s.table.segments(Holder::Peer(peer), bt);
            // Reserved blocks that hold nothing yet need no call.
            if segments.is_empty() {
                continue;
            }
            step.remote.push(RemotePart {
                peer,
                seq: id,
                attn,
                segments,
                appends: appends
                    .iter()
                    .filter(|a| a.0 == peer)
                    .map(|&(_, row, block, off)| (row, block, off))
                    .collect(),
            });
        }
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

/// Blocks a request of `need` blocks that fits in its home's pool of `total` borrows before it
/// starts, with `held` already borrowed and `free` local blocks free: the gManager's
/// `place_new` rule. A long request (more than `home_share` of the pool) keeps at most that
/// share here, and no more than is free, and takes the rest from creditors, so one long
/// request does not fill the home and preempt its batch later.
fn early_borrow(need: usize, held: usize, free: usize, total: usize, home_share: f64) -> usize {
    let share = (total as f64 * home_share).floor() as usize;
    if need <= share {
        return 0;
    }
    let local = share.min(free);
    // With no block free here, one that holds nothing waits for local blocks as a short one
    // does; one that already borrowed asks for the rest rather than hold loans while waiting.
    if local == 0 && held == 0 {
        return 0;
    }
    need.saturating_sub(held + local)
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
            RManager::new(blocks, 0.5),
        )
    }

    /// Borrows what the scheduler asks for from a peer's pool, then schedules: the engine's loop.
    fn schedule_borrowing(s: &mut Scheduler, peer: u16, lender: &mut RManager) -> Step {
        if let Some((id, n)) = s.borrow_want()
            && let Ok(blocks) = lender.lend(("home".into(), id), n)
        {
            s.add_borrowed(id, peer, &blocks);
        }
        s.schedule()
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
        s.add(1, (0..19).collect(), 1);
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
        s.add(1, vec![5, 6, 7], 4);
        drive(&mut s, 1);
        s.add(2, (0..10).collect(), 4);
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
        s.add(1, (0..8).collect(), 4);
        s.add(2, (0..7).collect(), 4);
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
            s.add(id, (0..(3 + id as u32 * 5)).collect(), 4);
        }
        for _ in 0..20 {
            let step = s.schedule();
            let mut owned: Vec<u32> = s
                .seqs
                .values()
                .flat_map(|q| q.table.blocks().iter().map(|b| b.block))
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

    #[test]
    fn a_request_that_outgrows_its_home_borrows_and_its_new_tokens_go_remote() {
        let mut s = sched(2, 64);
        let mut lender = RManager::new(8, 1.0);
        s.add(1, (0..6).collect(), 4);
        let step = schedule_borrowing(&mut s, 3, &mut lender);
        assert!(step.remote.is_empty(), "the prompt fits at home");
        for t in 0..3 {
            s.append_token(1, 9 + t);
        }
        // Tokens 6 and 7 fit in the home's two blocks; token 8 needs a borrowed block.
        let step = schedule_borrowing(&mut s, 3, &mut lender);
        assert_eq!(step.items[0].positions, 6..9);
        assert_eq!(step.remote.len(), 1);
        let r = &step.remote[0];
        assert_eq!(r.peer, 3);
        assert_eq!(r.appends.len(), 1);
        assert_eq!(
            r.appends[0].0, 2,
            "the third row, position 8, is stored by the peer"
        );
        assert_eq!(step.slots[2], NO_SLOT);
        assert_eq!(r.segments.len(), 1);
        assert_eq!((r.segments[0].first_pos, r.segments[0].tokens), (8, 1));
        assert_eq!(
            step.attn[0].segments.iter().map(|s| s.tokens).sum::<u32>(),
            8
        );
        assert_eq!(s.borrowed_blocks(), 1);
        s.remove(1);
        assert_eq!(s.take_released(), vec![(1, 3)]);
        assert_eq!(s.blocks_used(), 0);
    }

    #[test]
    fn a_request_larger_than_its_home_starts_with_its_whole_need_reserved() {
        let mut s = sched(2, 64);
        let mut lender = RManager::new(8, 1.0);
        s.add(1, (0..16).collect(), 4);
        let first = schedule_borrowing(&mut s, 1, &mut lender);
        assert_eq!(first.items[0].positions, 0..16);
        assert_eq!(lender.lent(), 3, "20 tokens: 2 local blocks and 3 borrowed");
        assert_eq!(first.remote.len(), 1);
        assert_eq!(
            first.remote[0].appends.len(),
            8,
            "tokens 8..16 are stored by the creditor"
        );
        s.append_token(1, 1);
        let second = schedule_borrowing(&mut s, 1, &mut lender);
        assert_eq!(lender.lent(), 3, "no further borrowing while it runs");
        assert!(second.preempted.is_empty());
    }

    #[test]
    fn a_request_that_cannot_reserve_everything_holds_nothing_and_waits() {
        let mut s = sched(2, 64);
        s.add(1, (0..16).collect(), 16);
        assert_eq!(s.borrow_want(), Some((1, 6)));
        let step = s.schedule();
        assert!(step.items.is_empty());
        assert_eq!(s.blocks_used(), 0, "no local block is held while it waits");
        assert_eq!(s.waiting(), 1);
    }

    #[test]
    fn a_lost_peer_sends_its_requests_back_to_be_recomputed() {
        let mut s = sched(2, 64);
        let mut lender = RManager::new(8, 1.0);
        // Request 1 needs 5 blocks: 2 at home, 3 on peer 3.
        s.add(1, (0..16).collect(), 4);
        let first = schedule_borrowing(&mut s, 3, &mut lender);
        assert_eq!(first.items[0].positions, 0..16);
        s.append_token(1, 99);
        assert_eq!(s.evict_holding(&[4]), (vec![], 0), "nothing held there");
        let (evicted, blocks) = s.evict_holding(&[3]);
        assert_eq!(evicted, vec![1]);
        assert_eq!(blocks, 4, "16 tokens in blocks of 4, wherever they were");
        assert_eq!(s.take_released(), vec![(1, 3)]);
        assert_eq!((s.running(), s.waiting(), s.blocks_used()), (0, 1, 0));
        // Recomputed from its tokens: the prompt and the token it had sampled.
        let again = schedule_borrowing(&mut s, 5, &mut lender);
        assert_eq!(again.items[0].positions, 0..17);
        assert!(again.remote.iter().all(|r| r.peer == 5));
    }

    #[test]
    fn a_waiting_request_drops_its_reservation_on_a_reclaiming_peer() {
        let mut s = sched(2, 64);
        s.add(1, (0..16).collect(), 4);
        s.add_borrowed(1, 3, &[0, 1]);
        s.add_borrowed(1, 4, &[5]);
        assert_eq!(s.evict_holding(&[4]), (vec![1], 0));
        let mut released = s.take_released();
        released.sort();
        assert_eq!(released, vec![(1, 3), (1, 4)], "all or nothing");
        assert_eq!(s.borrow_want(), Some((1, 3)));
    }

    #[test]
    fn a_reclaiming_peer_leaves_running_requests_in_place_for_migration() {
        let mut s = sched(2, 64);
        let mut lender = RManager::new(8, 1.0);
        // Request 1 runs on 2 local blocks and 3 on peer 3; request 2 waits with a reservation.
        s.add(1, (0..16).collect(), 4);
        schedule_borrowing(&mut s, 3, &mut lender);
        s.add(2, (0..16).collect(), 4);
        s.add_borrowed(2, 3, &[7]);
        assert_eq!(s.running_on(3), [1]);
        assert!(s.running_on(4).is_empty());
        let mut placed = s.placements();
        placed.sort_by_key(|&(id, h, _)| (id, h == Holder::Local));
        assert_eq!(
            placed,
            [(1, Holder::Peer(3), 3), (1, Holder::Local, 2)],
            "a waiting request's reservation is not a placement yet"
        );
        assert_eq!(s.drop_reservations_on(&[3]), [2]);
        assert_eq!(s.take_released(), [(2, 3)]);
        assert_eq!(
            s.running(),
            1,
            "the running request keeps its blocks while they move"
        );
        let table = s.running_table(1).unwrap().clone();
        assert_eq!(table.blocks().len(), 5);
        assert!(
            s.running_table(2).is_none(),
            "only running requests migrate"
        );
        // The fallback when nowhere has room: recompute from the token ids.
        assert_eq!(s.evict(1), 4, "16 tokens in blocks of 4");
        assert_eq!(s.take_released(), [(1, 3)]);
        assert_eq!(s.evict(1), 0, "no longer running");
        assert_eq!((s.running(), s.waiting()), (0, 2));
    }

    #[test]
    fn a_rolled_back_step_runs_the_same_positions_again() {
        let mut s = sched(8, 64);
        s.add(1, (0..6).collect(), 4);
        let step = s.schedule();
        s.rollback(&step.items);
        assert_eq!(s.blocks_used(), 2, "its blocks stay");
        let again = s.schedule();
        assert_eq!(again.items, step.items);
        assert_eq!(again.slots, step.slots);
    }

    #[test]
    fn a_long_request_borrows_beyond_its_home_share_before_it_starts() {
        // 16 blocks with a share of 0.25: a request keeps 4 blocks (16 tokens) here.
        let mut s = sched(16, 64).with_long_home_share(0.25);
        let mut lender = RManager::new(16, 1.0);
        s.add(1, (0..20).collect(), 12);
        assert_eq!(s.borrow_want(), Some((1, 4)), "32 tokens: 8 blocks, 4 here");
        let step = schedule_borrowing(&mut s, 2, &mut lender);
        assert_eq!(step.items[0].positions, 0..20);
        assert_eq!((s.blocks_used(), lender.lent()), (4, 4));
        assert_eq!(step.remote.len(), 1);
        assert_eq!(
            step.remote[0].appends.len(),
            4,
            "tokens 16..20 are stored by the creditor"
        );
        // The home keeps 12 blocks for short requests, which start without borrowing (while
        // request 1 decodes its next token).
        s.append_token(1, 7);
        s.add(2, (0..8).collect(), 8);
        assert_eq!(s.borrow_want(), None, "4 blocks is within the share");
        let step = schedule_borrowing(&mut s, 2, &mut lender);
        assert_eq!(step.items.len(), 2);
        assert_eq!((s.blocks_used(), lender.lent()), (6, 4));
    }

    #[test]
    fn a_long_request_that_cannot_borrow_runs_at_home() {
        let mut s = sched(16, 64).with_long_home_share(0.25);
        s.add(1, (0..20).collect(), 12);
        assert_eq!(s.borrow_want(), Some((1, 4)));
        // A round that got only part of it gives everything back (the engine's borrow).
        s.add_borrowed(1, 2, &[0, 1]);
        assert_eq!(s.unreserve(1), vec![2]);
        let step = s.schedule();
        assert_eq!(step.items[0].positions, 0..20);
        assert!(step.remote.is_empty());
        assert_eq!(s.blocks_used(), 5, "its prompt, on local blocks as before");
    }

    #[test]
    fn only_long_requests_with_a_share_borrow_early() {
        let mut s = sched(16, 64);
        s.add(1, (0..20).collect(), 12);
        assert_eq!(s.borrow_want(), None, "the share defaults to 1.0: off");
        let mut s = sched(16, 64).with_long_home_share(0.5);
        s.add(1, (0..20).collect(), 12);
        assert_eq!(s.borrow_want(), None, "8 blocks is half the pool");
    }

    #[test]
    fn a_running_request_with_nothing_to_run_gets_no_item() {
        let mut s = sched(16, 8);
        s.add(1, (0..5).collect(), 4);
        s.add(2, (0..3).collect(), 4);
        s.schedule();
        // Request 1's next token is in, request 2's is not yet.
        s.append_token(1, 9);
        let step = s.schedule();
        assert_eq!(step.items.len(), 1);
        assert_eq!(step.positions, vec![5]);
        assert_eq!(step.logit_rows, vec![0]);
    }

    #[test]
    fn an_unfilled_prompt_starts_at_its_last_token_with_every_block_held() {
        let mut s = sched(16, 8).with_unfilled_prompts(true);
        s.add(1, (0..40).collect(), 4);
        let step = s.schedule();
        // 40 prompt tokens in blocks of 4: ten blocks held, only position 39 runs.
        assert_eq!(step.positions, vec![39]);
        assert_eq!(step.logit_rows, vec![0]);
        assert_eq!(s.rmanager().free(), 16 - 10);
        s.append_token(1, 7);
        let step = s.schedule();
        assert_eq!(step.positions, vec![40]);
    }

    #[test]
    fn a_long_request_keeps_at_most_its_share_and_what_is_free_here() {
        // need, held, free, total, share
        assert_eq!(early_borrow(8, 0, 16, 16, 0.25), 4);
        assert_eq!(early_borrow(8, 4, 16, 16, 0.25), 0, "already borrowed");
        assert_eq!(early_borrow(4, 0, 16, 16, 0.25), 0, "within the share");
        assert_eq!(
            early_borrow(8, 0, 2, 16, 0.25),
            6,
            "2 free here: 6 elsewhere"
        );
        assert_eq!(
            early_borrow(8, 0, 0, 16, 0.25),
            0,
            "nothing free: it waits here"
        );
        assert_eq!(
            early_borrow(8, 4, 0, 16, 0.25),
            4,
            "the rest, rather than hold loans while it waits"
        );
        assert_eq!(early_borrow(16, 0, 16, 16, 1.0), 0, "1.0 turns it off");
        assert_eq!(early_borrow(2, 0, 3, 3, 0.25), 0, "a share under one block");
    }

    #[test]
    fn requests_that_fit_at_home_wait_rather_than_borrow() {
        let mut s = sched(1, 64);
        let mut lender = RManager::new(8, 1.0);
        s.add(1, (0..4).collect(), 0);
        s.add(2, (0..4).collect(), 0);
        let step = schedule_borrowing(&mut s, 1, &mut lender);
        assert_eq!(
            step.items.len(),
            1,
            "the second request waits for a local block"
        );
        assert_eq!(s.waiting(), 1);
        assert_eq!(lender.lent(), 0);
    }
}
