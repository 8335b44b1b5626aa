//! Block migration, the pure part: which blocks of which request move next, how many per engine
//! step (the rate limit), and the order that keeps a move safe. A move of one block is
//! two-phase: the destination reserves a block first, the K/V is copied, the home's block table
//! is pointed at the copy only once the destination acknowledged it (commit), and only then is
//! the source freed. A move that fails before its commit changes nothing but the reservation,
//! which goes back.

use std::time::{Duration, Instant};

use crate::rblock_pool::{BlockRef, BlockTable, Holder};
use crate::scheduler::SeqId;

/// Most blocks one request moves per engine step: 16 tokens of KV per layer with 16-token
/// blocks, which the paper found free next to a decode step.
pub const BLOCKS_PER_REQUEST_STEP: usize = 1;
/// Most blocks moved per engine step over all requests, so decode steps keep their pace.
pub const BLOCKS_PER_STEP: usize = 4;
/// How long an evacuation waits for room to appear before its request is recomputed instead.
pub const EVACUATE_PATIENCE: Duration = Duration::from_secs(3);

/// Why a request's blocks move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Job {
    /// Every block of `seq` held by `from` leaves it (the holder drains). Blocks go wherever
    /// there is room; after `until` with none, the request is recomputed instead.
    Evacuate {
        seq: SeqId,
        from: u16,
        until: Instant,
    },
    /// Up to `blocks` full local blocks of `seq` go to the creditor `to` (a move the gManager
    /// planned: the home makes room before it overflows).
    Offload { seq: SeqId, to: String, left: usize },
    /// Every block of `seq` held by `from`, a creditor that now serves requests of its own,
    /// comes home into blocks the home has spare; with none spare the job ends and the blocks
    /// stay where they are.
    Repatriate { seq: SeqId, from: u16 },
}

impl Job {
    pub fn seq(&self) -> SeqId {
        match self {
            Job::Evacuate { seq, .. } | Job::Offload { seq, .. } | Job::Repatriate { seq, .. } => {
                *seq
            }
        }
    }
}

/// One block to move: entry `index` of `seq`'s table, which holds `from`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pick {
    pub seq: SeqId,
    pub index: usize,
    pub from: BlockRef,
}

/// The blocks a job may move now, oldest first: for an evacuation or a repatriation every
/// block on the holder (the tail too: a move runs between two steps of this home, so nothing is
/// appended meanwhile); for an offload only full local blocks, leaving the tail where new
/// tokens land.
pub fn candidates(job: &Job, table: &BlockTable, block_tokens: usize) -> Vec<Pick> {
    let full = table.tokens() / block_tokens;
    table
        .blocks()
        .iter()
        .enumerate()
        .filter(|(i, b)| match job {
            Job::Evacuate { from, .. } | Job::Repatriate { from, .. } => {
                b.holder == Holder::Peer(*from)
            }
            Job::Offload { .. } => b.holder == Holder::Local && *i < full,
        })
        .map(|(index, &from)| Pick {
            seq: job.seq(),
            index,
            from,
        })
        .take(match job {
            Job::Offload { left, .. } => *left,
            Job::Evacuate { .. } | Job::Repatriate { .. } => usize::MAX,
        })
        .collect()
}

/// The rate limit: from the jobs in order, at most `per_request` blocks of one job and
/// `budget` blocks in all. `table` gives a running request's block table (`None`: the request
/// no longer runs, and its job is skipped).
pub fn pick<'a>(
    jobs: &[Job],
    budget: usize,
    per_request: usize,
    block_tokens: usize,
    table: impl Fn(SeqId) -> Option<&'a BlockTable>,
) -> Vec<(usize, Vec<Pick>)> {
    let mut left = budget;
    let mut out = Vec::new();
    for (j, job) in jobs.iter().enumerate() {
        if left == 0 {
            break;
        }
        let Some(t) = table(job.seq()) else {
            continue;
        };
        let picks: Vec<Pick> = candidates(job, t, block_tokens)
            .into_iter()
            .take(per_request.min(left))
            .collect();
        if !picks.is_empty() {
            left -= picks.len();
            out.push((j, picks));
        }
    }
    out
}

/// Whether a job has nothing left to do.
pub fn finished(job: &Job, table: Option<&BlockTable>, block_tokens: usize) -> bool {
    table.is_none_or(|t| candidates(job, t, block_tokens).is_empty())
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CommitError {
    #[error("block {index} of request {seq} was not copied yet; the table keeps its source")]
    NotCopied { seq: SeqId, index: usize },
    #[error("entry {index} of request {seq} no longer names the block being moved")]
    Moved { seq: SeqId, index: usize },
}

/// A block on its way: the source, the block reserved at the destination, and whether the
/// destination acknowledged the copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub pick: Pick,
    pub to: BlockRef,
    pub copied: bool,
}

/// Points the table at the copies, all or nothing, and returns the sources to free. Refused
/// while any copy is unacknowledged or an entry changed since the pick, so a block is never
/// freed while the table still reads it, and never read after it was freed.
pub fn commit(table: &mut BlockTable, moves: &[Move]) -> Result<Vec<BlockRef>, CommitError> {
    for m in moves {
        let (seq, index) = (m.pick.seq, m.pick.index);
        if !m.copied {
            return Err(CommitError::NotCopied { seq, index });
        }
        if table.blocks().get(index) != Some(&m.pick.from) {
            return Err(CommitError::Moved { seq, index });
        }
    }
    for m in moves {
        table.replace_block(m.pick.index, m.to);
    }
    Ok(moves.iter().map(|m| m.pick.from).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BT: usize = 4;

    fn table(holders: &[(Holder, u32)], tokens: usize) -> BlockTable {
        let mut t = BlockTable::default();
        for &(h, b) in holders {
            t.extend_blocks(h, &[b]);
        }
        t.push_tokens(tokens, BT);
        t
    }

    fn evacuate(seq: SeqId, from: u16) -> Job {
        Job::Evacuate {
            seq,
            from,
            until: Instant::now(),
        }
    }

    #[test]
    fn evacuations_and_repatriations_take_every_block_on_the_holder_offloads_only_full_local_ones()
    {
        use Holder::*;
        let t = table(&[(Local, 0), (Peer(2), 7), (Local, 1), (Peer(2), 8)], 14);
        let ev: Vec<usize> = candidates(&evacuate(1, 2), &t, BT)
            .iter()
            .map(|p| p.index)
            .collect();
        assert_eq!(ev, [1, 3], "the half-filled tail on the holder goes too");
        let home: Vec<usize> = candidates(&Job::Repatriate { seq: 1, from: 2 }, &t, BT)
            .iter()
            .map(|p| p.index)
            .collect();
        assert_eq!(
            home,
            [1, 3],
            "a repatriation takes what the busy creditor holds"
        );
        let off = Job::Offload {
            seq: 1,
            to: "w2".into(),
            left: 5,
        };
        let local: Vec<usize> = candidates(&off, &t, BT).iter().map(|p| p.index).collect();
        assert_eq!(local, [0, 2], "full local blocks only");
        let t = table(&[(Local, 0), (Local, 1)], 6);
        assert_eq!(
            candidates(&off, &t, BT).len(),
            1,
            "the tail being appended stays"
        );
        let one = Job::Offload {
            seq: 1,
            to: "w2".into(),
            left: 1,
        };
        let t = table(&[(Local, 0), (Local, 1), (Local, 2)], 12);
        assert_eq!(candidates(&one, &t, BT).len(), 1, "no more than planned");
    }

    #[test]
    fn the_rate_limit_bounds_each_request_and_the_step() {
        let tables: Vec<BlockTable> = (0..4)
            .map(|_| {
                table(
                    &[
                        (Holder::Peer(3), 0),
                        (Holder::Peer(3), 1),
                        (Holder::Peer(3), 2),
                    ],
                    12,
                )
            })
            .collect();
        let jobs: Vec<Job> = (0..4).map(|s| evacuate(s, 3)).collect();
        let got = pick(&jobs, 3, 1, BT, |s| tables.get(s as usize));
        assert_eq!(got.len(), 3, "three requests, one block each");
        assert!(got.iter().all(|(_, p)| p.len() == 1));
        let got = pick(&jobs, 4, 2, BT, |s| tables.get(s as usize));
        let sizes: Vec<usize> = got.iter().map(|(_, p)| p.len()).collect();
        assert_eq!(sizes, [2, 2], "two per request, four in the step");
        let got = pick(&jobs, 8, 1, BT, |s| (s != 0).then(|| &tables[s as usize]));
        assert_eq!(
            got.iter().map(|(j, _)| *j).collect::<Vec<_>>(),
            [1, 2, 3],
            "a request that no longer runs is skipped"
        );
    }

    #[test]
    fn commit_waits_for_every_copy_and_swaps_the_entries_all_at_once() {
        use Holder::*;
        let mut t = table(&[(Local, 0), (Peer(2), 7), (Peer(2), 8)], 10);
        let before = t.clone();
        let picks = candidates(&evacuate(1, 2), &t, BT);
        let mut moves: Vec<Move> = picks
            .iter()
            .zip([3, 4])
            .map(|(&pick, b)| Move {
                pick,
                to: BlockRef {
                    holder: Local,
                    block: b,
                },
                copied: false,
            })
            .collect();
        moves[0].copied = true;
        assert_eq!(
            commit(&mut t, &moves),
            Err(CommitError::NotCopied { seq: 1, index: 2 })
        );
        assert_eq!(t, before, "nothing swapped before every copy landed");
        moves[1].copied = true;
        let freed = commit(&mut t, &moves).unwrap();
        assert_eq!(
            freed.iter().map(|b| b.block).collect::<Vec<_>>(),
            [7, 8],
            "the sources are freed only after the swap"
        );
        assert_eq!(t.peers(), Vec::<u16>::new());
        assert_eq!(t.tokens(), 10, "positions stay where they were");
        assert_eq!(
            t.segments(Local, BT)
                .iter()
                .map(|s| (s.block, s.first_pos, s.tokens))
                .collect::<Vec<_>>(),
            [(0, 0, 4), (3, 4, 4), (4, 8, 2)]
        );
        assert_eq!(
            commit(&mut t, &moves),
            Err(CommitError::Moved { seq: 1, index: 1 }),
            "a stale move never overwrites an entry"
        );
    }

    #[test]
    fn a_job_ends_when_its_blocks_left_or_its_request_did() {
        use Holder::*;
        let job = evacuate(1, 2);
        let t = table(&[(Local, 0), (Peer(2), 7)], 6);
        assert!(!finished(&job, Some(&t), BT));
        let t = table(&[(Local, 0), (Local, 7)], 6);
        assert!(finished(&job, Some(&t), BT));
        assert!(finished(&job, None, BT));
    }
}
