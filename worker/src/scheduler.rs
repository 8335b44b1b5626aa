//! Continuous batching over the rBlock pool: which requests run in the next step, with how many
//! tokens each, and who gives up blocks when the pool runs dry. Pure logic, no model, no I/O.
//!
//! The step's budget is shared by the policy's rule (`infinite_llm_policy::share_step`): decodes
//! first, then prefill chunks, short prompts ahead of long ones, one long prefill capped. A
//! request's KV grows block by block as its tokens arrive: it starts with the blocks of its
//! first chunk, and `max_tokens` limits it without reserving anything. A running request that
//! needs a block takes a free local one; the engine borrows on creditors, a batch at a time,
//! for those the local pool cannot serve ([`Scheduler::shortfalls`]); when neither has one, the
//! newest running request yields its blocks and goes back to the queue, to be recomputed from
//! its token ids (vLLM's recompute policy), unless it fits its home and the one lacking a block
//! outgrows it: then that one waits (`yields_to`). Request ids grow with arrival time on every worker,
//! so "newest" means the same thing across the pool: a creditor full of its own requests lets
//! newer ones yield to lend to an older request of another home ([`Scheduler::yield_to`]), and
//! the oldest request in the pool always progresses.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;

pub use infinite_llm_policy::StepRule;
use infinite_llm_policy::{
    Want, borrow_batch, borrows_from_busy, repatriation_room, resume_blocks, share_step, yields_to,
};

use crate::backend::{AttnSeq, NO_SLOT};
use crate::dist_attention::RemotePart;
use crate::model::llama::StepInput;
use crate::rblock_pool::{BlockTable, Holder};
use crate::rmanager::RManager;

pub type SeqId = u64;

#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    pub block_tokens: usize,
    pub max_num_seqs: usize,
    /// How a step's token budget is shared.
    pub rule: StepRule,
}

#[derive(Debug)]
struct Seq {
    /// Prompt and generated tokens so far.
    tokens: Vec<u32>,
    /// Prompt plus the most tokens it may generate: a limit on its growth, never reserved.
    limit_tokens: usize,
    table: BlockTable,
    /// Blocks borrowed for its first chunk while it waits, by peer; they join its table when
    /// it starts.
    reserved: Vec<(u16, Vec<u32>)>,
    /// It yielded its blocks (preempted or evicted): it starts again only with room here.
    yielded: bool,
}

impl Seq {
    fn reserved_blocks(&self) -> usize {
        self.reserved.iter().map(|(_, b)| b.len()).sum()
    }
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

pub struct Scheduler {
    cfg: SchedulerConfig,
    /// Benchmarks only: a prompt's K/V counts as written, all but its last token.
    unfilled_prompts: bool,
    rm: RManager,
    seqs: HashMap<SeqId, Seq>,
    waiting: VecDeque<SeqId>,
    /// In the order they started.
    running: Vec<SeqId>,
    preemptions: u64,
    /// Requests that gave back blocks held by peers, for the engine to tell those peers.
    released: Vec<(SeqId, u16)>,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig, rm: RManager) -> Self {
        Self {
            cfg,
            unfilled_prompts: false,
            rm,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            preemptions: 0,
            released: Vec::new(),
        }
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
                limit_tokens: prompt.len() + max_new_tokens,
                tokens: prompt,
                table: BlockTable::default(),
                reserved: Vec::new(),
                yielded: false,
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

    /// The requests waiting to start, in queue order.
    pub fn waiting_ids(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.waiting.iter().copied()
    }

    pub fn running_ids(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.running.iter().copied()
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

    /// The requests that may get tokens in the next step, each with what it wants: every
    /// running one, then waiting ones while the batch has room.
    fn candidates(&self) -> (Vec<SeqId>, Vec<Want>) {
        let room = self.cfg.max_num_seqs.saturating_sub(self.running.len());
        let ids: Vec<SeqId> = self
            .running
            .iter()
            .copied()
            .chain(self.waiting.iter().copied().take(room))
            .collect();
        let wants = ids
            .iter()
            .map(|id| {
                let s = &self.seqs[id];
                let pending = s.tokens.len() - s.table.tokens() - self.skipped(*id);
                Want {
                    pending,
                    decode: pending == 1 && s.table.tokens() > 0,
                    context: s.table.tokens(),
                }
            })
            .collect();
        (ids, wants)
    }

    /// Prompt tokens taken as already written when a benchmark request starts.
    fn skipped(&self, id: SeqId) -> usize {
        let s = &self.seqs[&id];
        if self.unfilled_prompts && s.table.tokens() == 0 {
            s.tokens.len() - 1
        } else {
            0
        }
    }

    /// Blocks that must be free here before a request that yielded starts again (0 for one
    /// that never ran): room for its context, or the home to itself.
    fn resume_bar(&self, id: SeqId) -> usize {
        let s = &self.seqs[&id];
        if !s.yielded {
            return 0;
        }
        let home = self.rm.total() - self.rm.lent();
        resume_blocks(s.tokens.len().div_ceil(self.cfg.block_tokens), home)
    }

    /// Blocks request `id` lacks for its next `want` tokens (beyond what it holds or borrowed).
    fn chunk_need(&self, id: SeqId, want: usize) -> usize {
        let s = &self.seqs[&id];
        s.table
            .blocks_needed(self.skipped(id) + want, self.cfg.block_tokens)
            .saturating_sub(s.reserved_blocks())
    }

    /// What the next step lacks beyond the free local blocks, in the order it serves requests:
    /// (request, blocks to borrow for it, a batch at a time within its limit, whether creditors
    /// busy with their own requests may lend them: [`borrows_from_busy`]). The engine borrows
    /// these on creditors before it schedules. A request that yielded borrows only once its
    /// home has room for it ([`resume_blocks`]).
    pub fn shortfalls(&self) -> Vec<(SeqId, usize, bool)> {
        let (ids, wants) = self.candidates();
        let mut free = self.rm.free();
        let mut out = Vec::new();
        for (i, n) in share_step(&self.cfg.rule, &wants, self.rm.lent() > 0) {
            let id = ids[i];
            if free < self.resume_bar(id) {
                continue;
            }
            let need = self.chunk_need(id, n);
            let local = need.min(free);
            free -= local;
            if need == local {
                continue;
            }
            let s = &self.seqs[&id];
            let held = s.table.blocks().len() + s.reserved_blocks() + local;
            let limit = self.limit_blocks(id);
            let room = limit.saturating_sub(held);
            let home = self.rm.total() - self.rm.lent();
            let busy_too = borrows_from_busy(limit, home, self.waiting.contains(&id));
            out.push((id, borrow_batch(need - local, room), busy_too));
        }
        out
    }

    /// Plans the next step and claims the KV slots it writes.
    pub fn schedule(&mut self) -> Step {
        let mut step = Step::default();
        let (ids, wants) = self.candidates();
        let mut planned: Vec<(SeqId, usize)> = Vec::new();
        for (i, want) in share_step(&self.cfg.rule, &wants, self.rm.lent() > 0) {
            let id = ids[i];
            if step.preempted.contains(&id) {
                continue;
            }
            if self.waiting.contains(&id) {
                let n = self.start(id, want);
                if n > 0 {
                    planned.push((id, n));
                }
                continue;
            }
            // Running (unless it yielded earlier in this step): local blocks, then the newest
            // running request yields until it fits, or itself is the newest. Alone, and with
            // no older request waiting here, it keeps its blocks and waits for a loan:
            // yielding would free blocks no older request here wants, and it would only refill
            // them (an older request of another home takes them through `yield_to`). One that
            // outgrows its home waits for the newest rather than evict it if that one fits.
            while self.running.contains(&id) {
                let fit = self.grow(id, want);
                if fit > 0 {
                    planned.push((id, fit));
                    break;
                }
                if self.running.len() == 1 && self.waiting.iter().all(|&w| w > id) {
                    break;
                }
                let victim = self.newest_running().expect("id is running");
                let home = self.rm.total() - self.rm.lent();
                if victim != id
                    && !yields_to(self.limit_blocks(id), self.limit_blocks(victim), home)
                {
                    break;
                }
                self.preempt(victim);
                planned.retain(|&(p, _)| p != victim);
                step.preempted.push(victim);
            }
        }
        for (id, n) in planned {
            self.plan_item(&mut step, id, n);
        }
        step
    }

    /// Starts waiting request `id` with up to `want` tokens, as many as its blocks here hold
    /// (free local ones first, then those borrowed for it); returns how many, 0 if it cannot.
    fn start(&mut self, id: SeqId, want: usize) -> usize {
        let bt = self.cfg.block_tokens;
        let free = self.rm.free();
        let skip = self.skipped(id);
        let slots = (free + self.seqs[&id].reserved_blocks()) * bt;
        if self.running.len() >= self.cfg.max_num_seqs
            || free < self.resume_bar(id)
            || slots <= skip
        {
            return 0;
        }
        let n = want.min(slots - skip);
        let chunk = self.seqs[&id].table.blocks_needed(skip + n, bt);
        let local = self.rm.alloc_local(chunk);
        let seq = self.seqs.get_mut(&id).unwrap();
        // Running again, it grows (and borrows) as any running request does.
        seq.yielded = false;
        seq.table.extend_blocks(Holder::Local, &local);
        for (peer, blocks) in seq.reserved.drain(..) {
            seq.table.extend_blocks(Holder::Peer(peer), &blocks);
        }
        seq.table.push_tokens(skip, bt);
        self.waiting.retain(|&w| w != id);
        self.running.push(id);
        n
    }

    /// Blocks request `id` may grow to: its prompt plus `max_tokens`.
    fn limit_blocks(&self, id: SeqId) -> usize {
        self.seqs[&id].limit_tokens.div_ceil(self.cfg.block_tokens)
    }

    /// The running request that arrived last (ids grow with arrival time).
    fn newest_running(&self) -> Option<SeqId> {
        self.running.iter().copied().max()
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

    /// Adds blocks that `peer` reserved for request `id`: to its table if it runs (they fill
    /// after the blocks it holds), else to what it starts with.
    pub fn add_borrowed(&mut self, id: SeqId, peer: u16, blocks: &[u32]) {
        let running = self.running.contains(&id);
        let Some(seq) = self.seqs.get_mut(&id) else {
            // Gone while the round ran: the blocks go back.
            self.released.push((id, peer));
            return;
        };
        if running {
            seq.table.extend_blocks(Holder::Peer(peer), blocks);
        } else {
            seq.reserved.push((peer, blocks.to_vec()));
        }
    }

    /// A creditor's part of "the oldest progresses": before lending `blocks` for another
    /// home's request `asker`, its own running requests newer than `asker` yield, newest
    /// first, while that frees blocks it may lend (within the lend cap). Returns them.
    pub fn yield_to(&mut self, asker: SeqId, blocks: usize) -> Vec<SeqId> {
        let mut yielded = Vec::new();
        let lendable = |rm: &RManager| rm.lend_cap().saturating_sub(rm.lent()).min(blocks);
        while self.rm.free() < lendable(&self.rm) {
            match self.newest_running() {
                Some(newest) if newest > asker => {
                    self.preempt(newest);
                    yielded.push(newest);
                }
                _ => break,
            }
        }
        yielded
    }

    fn preempt(&mut self, id: SeqId) {
        self.requeue(id);
        self.preemptions += 1;
    }

    /// Frees a running request's blocks and puts it at the front of the queue, to be
    /// recomputed from its token ids once there is room for it.
    fn requeue(&mut self, id: SeqId) {
        let seq = self.seqs.get_mut(&id).unwrap();
        seq.yielded = true;
        let mut table = std::mem::take(&mut seq.table);
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
    /// A creditor calls back what it lent request `id` for an older request of another
    /// home: a running `id` yields everything it holds (recomputed later), a waiting one its
    /// reservations. Whether it was running.
    pub fn recall(&mut self, id: SeqId) -> bool {
        if self.running.contains(&id) {
            self.preempt(id);
            return true;
        }
        if let Some(seq) = self.seqs.get_mut(&id) {
            self.released
                .extend(seq.reserved.drain(..).map(|(p, _)| (id, p)));
        }
        false
    }

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

    /// Local blocks that blocks on busy creditors may come home into: what the running
    /// requests' next tokens and the first chunk of the next waiting request leave
    /// ([`repatriation_room`]).
    pub fn repatriation_room(&self) -> usize {
        let next_chunk = self.waiting.front().map_or(0, |&id| {
            let s = &self.seqs[&id];
            let pending = s.tokens.len() - s.table.tokens() - self.skipped(id);
            self.chunk_need(id, pending.min(self.cfg.rule.max_batched_tokens))
        });
        repatriation_room(self.rm.free(), self.running.len(), next_chunk)
    }

    /// The creditors that hold blocks of running requests.
    pub fn lenders(&self) -> Vec<u16> {
        let mut peers: Vec<u16> = self
            .running
            .iter()
            .flat_map(|id| self.seqs[id].table.peers())
            .collect();
        peers.sort_unstable();
        peers.dedup();
        peers
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

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(blocks: usize, max_tokens: usize) -> Scheduler {
        sched_long(blocks, max_tokens, 1000, 0.5)
    }

    /// Prompts with more than `long` tokens left are long and take `share` of a shared step.
    fn sched_long(blocks: usize, max_tokens: usize, long: usize, share: f64) -> Scheduler {
        Scheduler::new(
            SchedulerConfig {
                block_tokens: 4,
                max_num_seqs: 8,
                rule: StepRule {
                    max_batched_tokens: max_tokens,
                    long_prefill_tokens: long,
                    long_prefill_share: share,
                    long_prefill_pairs: 0,
                },
            },
            RManager::new(blocks, 0.5),
        )
    }

    /// Borrows what the scheduler lacks from a peer's pool, then schedules: the engine's loop.
    fn schedule_borrowing(s: &mut Scheduler, peer: u16, lender: &mut RManager) -> Step {
        for (id, n, _) in s.shortfalls() {
            if let Ok(blocks) = lender.lend_up_to(("home".into(), id), n) {
                s.add_borrowed(id, peer, &blocks);
            }
        }
        s.schedule()
    }

    /// Runs steps, appending token 1 to every sampling request.
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
    fn short_prompts_go_ahead_of_a_long_one_which_takes_at_most_its_share() {
        let mut s = sched_long(64, 16, 8, 0.25);
        s.add(1, (0..40).collect(), 4);
        s.add(2, (0..6).collect(), 4);
        let step = s.schedule();
        let fed: Vec<(SeqId, Range<usize>)> = step
            .items
            .iter()
            .map(|it| (it.seq, it.positions.clone()))
            .collect();
        assert_eq!(
            fed,
            [(2, 0..6), (1, 0..4)],
            "a quarter of 16 for the long one"
        );
        s.remove(2);
        let step = s.schedule();
        assert_eq!(
            step.items[0].positions,
            4..20,
            "alone, it takes the whole step"
        );
    }

    #[test]
    fn a_request_starts_with_its_first_chunk_and_max_tokens_reserves_nothing() {
        let mut s = sched(8, 8);
        s.add(1, (0..6).collect(), 1_000_000);
        s.add(2, (0..2).collect(), 1_000_000);
        let step = s.schedule();
        assert_eq!(step.items.len(), 2, "both start at once");
        assert_eq!(s.blocks_used(), 3, "two blocks for 6 tokens, one for 2");
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
    fn a_request_that_fits_its_home_keeps_its_blocks_from_one_that_outgrows_it() {
        let mut s = sched(4, 64);
        // Request 1 may grow to 37 tokens (10 blocks), more than its home's 4; request 2 fits.
        s.add(1, (0..7).collect(), 30);
        s.add(2, (0..5).collect(), 3);
        drive(&mut s, 2);
        assert_eq!(s.blocks_used(), 4);
        // Request 1's 9th token needs a third block: request 2, newer, keeps its blocks.
        let steps = drive(&mut s, 1);
        assert!(steps[0].preempted.is_empty());
        let fed: Vec<SeqId> = steps[0].items.iter().map(|it| it.seq).collect();
        assert_eq!(fed, [2], "request 1 waits");
        // It grows once request 2 is done.
        s.remove(2);
        let fed: Vec<SeqId> = s.schedule().items.iter().map(|it| it.seq).collect();
        assert_eq!(fed, [1]);
        assert_eq!(s.preemptions(), 0);
    }

    #[test]
    fn a_lone_request_out_of_blocks_keeps_them_and_waits_for_a_loan() {
        let mut s = sched(2, 64);
        s.add(1, (0..7).collect(), 8);
        drive(&mut s, 2);
        assert_eq!(s.blocks_used(), 2);
        // Its 9th token needs a third block of 4 tokens, and nothing here can free one.
        let step = s.schedule();
        assert!(step.items.is_empty() && step.preempted.is_empty());
        assert_eq!((s.running(), s.preemptions(), s.blocks_used()), (1, 0, 2));
        // It may still grow to 15 tokens (4 blocks): it asks the pool for the 2 it may use.
        assert_eq!(s.shortfalls(), [(1, 2, true)]);
    }

    #[test]
    fn a_lone_request_out_of_blocks_yields_to_an_older_one_waiting_here() {
        let mut s = sched(4, 64);
        s.add(5, (0..15).collect(), 8);
        drive(&mut s, 2);
        // An older request yielded here earlier (to another home) and waits for room.
        s.add(3, (0..9).collect(), 8);
        s.seqs.get_mut(&3).unwrap().yielded = true;
        let step = s.schedule();
        assert_eq!(step.preempted, [5]);
        assert_eq!(step.items[0].seq, 3, "the older request takes the blocks");
    }

    #[test]
    fn a_worker_that_lends_keeps_its_lone_long_prefill_to_the_shared_cap() {
        let mut s = sched_long(32, 16, 8, 0.5);
        s.add(1, (0..40).collect(), 1);
        assert_eq!(drive(&mut s, 1)[0].items[0].positions, 0..16, "alone");
        // Another home's request now waits on this worker's steps.
        s.rmanager_mut().lend_up_to(("w1".into(), 9), 2).unwrap();
        assert_eq!(drive(&mut s, 1)[0].items[0].positions, 16..24);
    }

    #[test]
    fn a_request_that_yielded_and_started_again_borrows_as_it_grows() {
        let mut s = sched(4, 64);
        s.add(5, (0..15).collect(), 8);
        drive(&mut s, 1);
        assert_eq!(
            s.yield_to(1, 2),
            [5],
            "an older request of another home asks"
        );
        s.rmanager_mut().lend_up_to(("w1".into(), 1), 2).unwrap();
        // Its 16 tokens need 4 blocks; the home can give it 2, all it has: it starts again.
        let step = s.schedule();
        assert_eq!(step.items[0].seq, 5);
        drive(&mut s, 1);
        // It lacks 2 blocks for the rest of its context and may grow to 6: a batch of 4.
        assert_eq!(s.shortfalls(), [(5, 4, true)]);
    }

    #[test]
    fn a_preempted_request_waits_for_room_for_its_context() {
        let mut s = sched(6, 64);
        s.add(1, (0..8).collect(), 8);
        s.add(2, (0..7).collect(), 8);
        drive(&mut s, 2);
        // 4 blocks held; request 1 grows to a third block, request 2 to its third: 6 of 6.
        s.append_token(1, 1);
        drive(&mut s, 3);
        assert_eq!(s.preemptions(), 1);
        assert_eq!(s.waiting(), 1);
        // Request 2's 9 tokens need 3 blocks: with 2 free it stays out, not to take back
        // the blocks request 1 grows into.
        let free = s.rmanager().free();
        assert!(free < 3, "{free} free");
        assert!(s.schedule().items.iter().all(|it| it.seq == 1));
        assert_eq!(s.waiting(), 1);
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
    fn a_request_that_outgrows_its_home_borrows_a_batch_and_its_new_tokens_go_remote() {
        let mut s = sched(2, 64);
        let mut lender = RManager::new(64, 1.0);
        s.add(1, (0..6).collect(), 100);
        let step = schedule_borrowing(&mut s, 3, &mut lender);
        assert!(step.remote.is_empty(), "the prompt fits at home");
        assert_eq!(lender.lent(), 0, "nothing borrowed ahead of need");
        for t in 0..3 {
            s.append_token(1, 9 + t);
        }
        // Tokens 6 and 7 fit in the home's two blocks; token 8 needs a borrowed block, and a
        // batch comes at once.
        assert_eq!(
            s.shortfalls(),
            [(1, infinite_llm_policy::BORROW_BATCH_BLOCKS, true)]
        );
        let step = schedule_borrowing(&mut s, 3, &mut lender);
        assert_eq!(lender.lent(), infinite_llm_policy::BORROW_BATCH_BLOCKS);
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
        s.append_token(1, 20);
        assert!(
            s.shortfalls().is_empty(),
            "the batch serves the next tokens"
        );
        s.remove(1);
        assert_eq!(s.take_released(), vec![(1, 3)]);
        assert_eq!(s.blocks_used(), 0);
    }

    #[test]
    fn a_prompt_larger_than_its_home_prefills_chunk_by_chunk_borrowing_as_it_goes() {
        let mut s = sched(2, 8);
        let mut lender = RManager::new(64, 1.0);
        s.add(1, (0..24).collect(), 4);
        let first = schedule_borrowing(&mut s, 1, &mut lender);
        assert_eq!(first.items[0].positions, 0..8);
        assert_eq!(lender.lent(), 0, "the first chunk fits at home");
        let second = schedule_borrowing(&mut s, 1, &mut lender);
        assert_eq!(second.items[0].positions, 8..16);
        assert_eq!(
            lender.lent(),
            5,
            "the rest of the request (28 tokens, 7 blocks) in one batch"
        );
        assert_eq!(second.remote[0].appends.len(), 8);
        let third = schedule_borrowing(&mut s, 1, &mut lender);
        assert_eq!(third.items[0].positions, 16..24);
        assert_eq!(lender.lent(), 5, "no round trip per chunk");
    }

    #[test]
    fn a_full_home_borrows_a_new_requests_first_chunk() {
        let mut s = sched(1, 64);
        let mut lender = RManager::new(8, 1.0);
        s.add(1, (0..4).collect(), 0);
        s.add(2, (0..4).collect(), 0);
        let step = schedule_borrowing(&mut s, 1, &mut lender);
        assert_eq!(step.items.len(), 2, "the second starts on a borrowed block");
        assert_eq!(lender.lent(), 1);
        assert_eq!(step.remote.len(), 1);
    }

    #[test]
    fn a_creditor_lets_its_newer_requests_yield_to_an_older_one() {
        let mut s = sched(4, 64);
        s.add(10, (0..8).collect(), 4);
        s.add(30, (0..8).collect(), 4);
        drive(&mut s, 1);
        assert_eq!(s.rmanager().free(), 0);
        assert!(s.yield_to(40, 2).is_empty(), "a newer asker waits");
        assert_eq!(s.yield_to(20, 2), [30]);
        assert_eq!(s.rmanager().lendable(), 2);
        assert!(s.yield_to(5, 2).is_empty(), "already lendable");
        assert_eq!(s.running(), 1);
    }

    #[test]
    fn a_lost_peer_sends_its_requests_back_to_be_recomputed() {
        let mut s = sched(2, 64);
        let mut lender = RManager::new(8, 1.0);
        // Request 1: 2 blocks at home, the rest on peer 3.
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
        // Recomputed from its tokens: the prompt and the token it had sampled, once the home
        // has room for it (here: the whole home).
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
        assert_eq!(
            s.shortfalls(),
            [(1, 3, true)],
            "its 5 blocks, less the home's 2"
        );
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
}
