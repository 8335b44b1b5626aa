//! The home's side of block migration: runs, between two engine steps, the moves `migration`
//! picks (evacuations off draining creditors, the gManager's planned offloads, repatriations
//! off creditors that became busy): reserve at the destination (a local block or a creditor's
//! `Reserve`), copy (the backend's block read and write, `Fetch` from a creditor source,
//! `Store` to a creditor destination), commit the block table, then free the source (locally
//! or `ReleaseBlocks`).
//! Between GPUs with direct links the blocks go over NCCL instead, device to device.
//! Each step moves a few blocks only, so the requests keep decoding while their blocks move;
//! while it waits for a peer the engine keeps answering other homes.

use std::sync::mpsc::Receiver;
use std::time::Instant;

use crate::backend::{Backend, DeviceLink};
use crate::cluster_link::ClusterLink;
use crate::creditor::{PEER_TIMEOUT, serve_home};
use crate::inbox::{Inbox, Submitted};
use crate::migration::{
    self, BLOCKS_PER_REQUEST_STEP, BLOCKS_PER_STEP, EVACUATE_PATIENCE, Job, Move, Pick,
};
use crate::model::llama::Llama;
use crate::rblock_pool::{BlockRef, Holder};
use crate::scheduler::{Scheduler, SeqId};

/// What the migrator works with, borrowed from the engine for one step's moves.
pub struct Ctx<'a, B: Backend> {
    pub model: &'a Llama<B>,
    pub kv: &'a mut B::Kv,
    pub scheduler: &'a mut Scheduler,
    pub link: &'a mut ClusterLink,
    pub inbox: &'a Receiver<Inbox>,
    pub stash: &'a mut Vec<Submitted>,
}

impl<B: Backend> Ctx<'_, B> {
    /// The link, the inbox, and what handles whatever arrives while a migration waits for a
    /// peer: the engine's own answers (the cache is free between steps).
    fn split(&mut self) -> (&mut ClusterLink, &Receiver<Inbox>, impl FnMut(Inbox) + '_) {
        let Ctx {
            model,
            kv,
            scheduler,
            link,
            inbox,
            stash,
        } = self;
        let serve = move |m| match m {
            Inbox::Submit(s) => stash.push(s),
            Inbox::Peer(m) => serve_home(model, kv, scheduler, m),
            Inbox::Drain => {}
        };
        (&mut **link, *inbox, serve)
    }
}

/// Why a batch of moves did not happen.
#[derive(Debug, PartialEq, Eq)]
enum Missed {
    /// No destination had a free block.
    NoRoom,
    /// A peer was lost or refused on the way; the reservation went back.
    Failed,
}

#[derive(Default)]
pub struct Migrator {
    jobs: Vec<Job>,
    /// Blocks moved since start (a counter for metrics).
    pub migrated_total: u64,
}

impl Migrator {
    /// Blocks of running requests still to move (one job per request and reason).
    pub fn in_flight(&self) -> usize {
        self.jobs.len()
    }

    /// Moves every block of `seqs` that `peer` holds elsewhere (it drains).
    pub fn evacuate(&mut self, peer: u16, seqs: Vec<SeqId>) {
        let until = Instant::now() + EVACUATE_PATIENCE;
        // The evacuation supersedes a repatriation off the same creditor: two jobs would pick
        // the same blocks, and the second commit would be refused.
        self.jobs.retain(
            |j| !matches!(j, Job::Repatriate { seq, from } if *from == peer && seqs.contains(seq)),
        );
        for seq in seqs {
            let job = Job::Evacuate {
                seq,
                from: peer,
                until,
            };
            if !self.jobs.contains(&job) {
                self.jobs.push(job);
            }
        }
    }

    /// Moves up to `blocks` full local blocks of `seq` to the creditor `to` (a planned move);
    /// a request already moving gets no second job.
    pub fn offload(&mut self, seq: SeqId, to: String, blocks: usize) {
        let busy = self.jobs.iter().any(|j| j.seq() == seq);
        if !busy && blocks > 0 {
            self.jobs.push(Job::Offload {
                seq,
                to,
                left: blocks,
            });
        }
    }

    /// Brings home every block of `seqs` that `peer`, now busy with requests of its own,
    /// holds, as spare local blocks allow; a request already moving gets no second job.
    pub fn repatriate(&mut self, peer: u16, seqs: Vec<SeqId>) {
        for seq in seqs {
            if !self.jobs.iter().any(|j| j.seq() == seq) {
                self.jobs.push(Job::Repatriate { seq, from: peer });
            }
        }
    }

    /// Runs one step's moves. Returns the requests whose evacuation found no room in time:
    /// the engine recomputes them.
    pub fn run<B: Backend>(&mut self, cx: &mut Ctx<'_, B>) -> Vec<SeqId> {
        let bt = cx.scheduler.block_tokens();
        let sched = &*cx.scheduler;
        self.jobs
            .retain(|j| !migration::finished(j, sched.running_table(j.seq()), bt));
        let picked = migration::pick(
            &self.jobs,
            BLOCKS_PER_STEP,
            BLOCKS_PER_REQUEST_STEP,
            bt,
            |s| sched.running_table(s),
        );
        let mut drop = Vec::new();
        let mut recompute = Vec::new();
        for (j, picks) in picked {
            match move_blocks(cx, &self.jobs[j], &picks) {
                Ok(n) => {
                    self.migrated_total += n as u64;
                    if let Job::Offload { left, .. } = &mut self.jobs[j] {
                        *left -= n;
                    }
                }
                Err(Missed::NoRoom) => match &self.jobs[j] {
                    Job::Evacuate { seq, until, .. } if Instant::now() >= *until => {
                        recompute.push(*seq);
                        drop.push(j);
                    }
                    Job::Evacuate { .. } => {}
                    Job::Offload { .. } | Job::Repatriate { .. } => drop.push(j),
                },
                // A lost peer sends its requests through recovery; the job ends with them.
                Err(Missed::Failed) => {}
            }
        }
        let mut j = 0;
        self.jobs.retain(|_| {
            j += 1;
            !drop.contains(&(j - 1))
        });
        recompute
    }
}

/// Moves the picked blocks of one job to one destination; returns how many moved.
fn move_blocks<B: Backend>(
    cx: &mut Ctx<'_, B>,
    job: &Job,
    picks: &[Pick],
) -> Result<usize, Missed> {
    let seq = job.seq();
    let (dest, blocks) = reserve(cx, job, picks.len())?;
    let to = |block| BlockRef {
        holder: dest,
        block,
    };
    let moves: Vec<Move> = match copy_direct(cx, seq, picks, dest, &blocks) {
        Some(copied) => picks
            .iter()
            .zip(&blocks)
            .map(|(&pick, &block)| Move {
                pick,
                to: to(block),
                copied,
            })
            .collect(),
        None => {
            let mut moves = Vec::with_capacity(blocks.len());
            for (&pick, &block) in picks.iter().zip(&blocks) {
                let copied = copy(cx, seq, pick.from, to(block));
                moves.push(Move {
                    pick,
                    to: to(block),
                    copied,
                });
                if !copied {
                    break;
                }
            }
            moves
        }
    };
    let table = cx
        .scheduler
        .running_table_mut(seq)
        .expect("no step ran while the blocks moved");
    match migration::commit(table, &moves) {
        Ok(sources) => {
            free(cx, seq, &sources);
            tracing::debug!(seq, blocks = moves.len(), to = ?dest, "blocks migrated");
            Ok(moves.len())
        }
        Err(e) => {
            tracing::warn!(seq, error = %e, "migration abandoned; the blocks stay where they were");
            let reserved: Vec<BlockRef> = blocks.iter().map(|&b| to(b)).collect();
            free(cx, seq, &reserved);
            Err(Missed::Failed)
        }
    }
}

/// Phase one: up to `n` blocks at the destination. An evacuation takes local free blocks
/// first (no copy over the network), then the advised creditors; an offload goes where the
/// gManager planned; a repatriation only into spare local blocks.
fn reserve<B: Backend>(
    cx: &mut Ctx<'_, B>,
    job: &Job,
    n: usize,
) -> Result<(Holder, Vec<u32>), Missed> {
    let seq = job.seq();
    let candidates = match job {
        Job::Evacuate { from, .. } => {
            // Local blocks beyond one per running request only: a move must not make a
            // request that grows next step preempt another.
            let spare = cx
                .scheduler
                .rmanager()
                .free()
                .saturating_sub(cx.scheduler.running());
            let local = cx.scheduler.rmanager_mut().alloc_local(n.min(spare));
            if !local.is_empty() {
                return Ok((Holder::Local, local));
            }
            cx.link.destinations(Some(*from))
        }
        Job::Offload { to, .. } => cx.link.advised_peer(to).into_iter().collect(),
        Job::Repatriate { .. } => {
            let spare = cx.scheduler.repatriation_room();
            let local = cx.scheduler.rmanager_mut().alloc_local(n.min(spare));
            if local.is_empty() {
                return Err(Missed::NoRoom);
            }
            return Ok((Holder::Local, local));
        }
    };
    for peer in candidates {
        let (link, inbox, mut serve) = cx.split();
        let got = link.reserve(peer, seq, n, inbox, &mut serve);
        if !got.is_empty() {
            return Ok((Holder::Peer(peer), got));
        }
    }
    Err(Missed::NoRoom)
}

/// Phase two over direct links (NCCL), every block in one group a link: from a creditor into
/// local blocks, from local blocks to a creditor, or from one creditor to another through
/// transit blocks of the home's pool (free again before the next step). `None` where a link is
/// missing (no GPU, TCP forced, not up yet) or no transit block is free, for `copy`; otherwise
/// whether every block landed.
fn copy_direct<B: Backend>(
    cx: &mut Ctx<'_, B>,
    seq: SeqId,
    picks: &[Pick],
    dest: Holder,
    blocks: &[u32],
) -> Option<bool> {
    let picks = &picks[..blocks.len()];
    let source = picks.first()?.from.holder;
    if picks.iter().any(|p| p.from.holder != source) {
        return None;
    }
    let sources: Vec<u32> = picks.iter().map(|p| p.from.block).collect();
    match (source, dest) {
        (Holder::Peer(p), Holder::Local) => {
            let link = cx.link.direct_link(p)?;
            Some(move_over(cx, &link, p, seq, blocks, sources, true))
        }
        (Holder::Local, Holder::Peer(p)) => {
            let link = cx.link.direct_link(p)?;
            Some(move_over(
                cx,
                &link,
                p,
                seq,
                &sources,
                blocks.to_vec(),
                false,
            ))
        }
        (Holder::Peer(from), Holder::Peer(to)) => {
            let (a, b) = (cx.link.direct_link(from)?, cx.link.direct_link(to)?);
            let transit = cx.scheduler.rmanager_mut().alloc_local(blocks.len());
            let done = (transit.len() == blocks.len()).then(|| {
                move_over(cx, &a, from, seq, &transit, sources, true)
                    && move_over(cx, &b, to, seq, &transit, blocks.to_vec(), false)
            });
            cx.scheduler.rmanager_mut().release_local(&transit);
            done
        }
        (Holder::Local, Holder::Local) => None,
    }
}

/// One group over `link`: `remote`, lent for `seq` on `peer`, into `local` (`fetch`), or
/// `local` into `remote`; true once both sides are done. A failure loses the peer: the home's
/// side may be left queued with nothing to pair with.
fn move_over<B: Backend>(
    cx: &mut Ctx<'_, B>,
    link: &DeviceLink,
    peer: u16,
    seq: SeqId,
    local: &[u32],
    remote: Vec<u32>,
    fetch: bool,
) -> bool {
    // The home's side goes first: the creditor completes the pair as soon as it is asked.
    if let Err(e) = cx.model.backend().link_move(link, cx.kv, local, !fetch) {
        cx.link.lost(peer, &format!("a block move: {e}"));
        return false;
    }
    let moved = {
        let (l, inbox, mut serve) = cx.split();
        l.move_blocks(peer, seq, remote, fetch, inbox, &mut serve)
    };
    if !moved {
        return false;
    }
    match cx.model.backend().link_move_wait(link, PEER_TIMEOUT) {
        Ok(()) => true,
        Err(e) => {
            cx.link.lost(peer, &format!("a block move: {e}"));
            false
        }
    }
}

/// Phase two: the K/V of `from` into `to`; true once it landed.
fn copy<B: Backend>(cx: &mut Ctx<'_, B>, seq: SeqId, from: BlockRef, to: BlockRef) -> bool {
    let data = match from.holder {
        Holder::Local => cx.model.backend().kv_read_block(cx.kv, from.block),
        Holder::Peer(p) => {
            let (link, inbox, mut serve) = cx.split();
            match link.fetch(p, seq, from.block, inbox, &mut serve) {
                Some(d) => d,
                None => return false,
            }
        }
    };
    match to.holder {
        Holder::Local => {
            cx.model.backend().kv_write_block(cx.kv, to.block, &data);
            true
        }
        Holder::Peer(p) => {
            let (link, inbox, mut serve) = cx.split();
            link.store(p, seq, to.block, data, inbox, &mut serve)
        }
    }
}

/// Phase four (or a reservation given back): frees blocks wherever they are.
fn free<B: Backend>(cx: &mut Ctx<'_, B>, seq: SeqId, blocks: &[BlockRef]) {
    let local: Vec<u32> = blocks
        .iter()
        .filter(|b| b.holder == Holder::Local)
        .map(|b| b.block)
        .collect();
    cx.scheduler.rmanager_mut().release_local(&local);
    let mut peers: Vec<u16> = blocks
        .iter()
        .filter_map(|b| match b.holder {
            Holder::Peer(p) => Some(p),
            Holder::Local => None,
        })
        .collect();
    peers.sort_unstable();
    peers.dedup();
    for p in peers {
        let theirs = blocks
            .iter()
            .filter(|b| b.holder == Holder::Peer(p))
            .map(|b| b.block)
            .collect();
        cx.link.release_blocks(seq, p, theirs);
    }
}
