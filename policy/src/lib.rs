//! The pool's serving policy as pure rules (no I/O, no clock): how one step's token budget is
//! shared, how many blocks a growing request borrows at once, and when a preempted request may
//! start again. The worker's scheduler runs them on real requests and the operator's simulator
//! on simulated ones, so `make simulate` measures the policy the engine has.
//!
//! The rule as a whole (DESIGN.md §2, Growth): a request's KV grows block by block as its tokens
//! arrive. Admission needs only the blocks of its next prefill chunk; `max_tokens` is a limit,
//! never a reservation. A block comes from the home's free blocks first, else from a creditor
//! the gManager advised (a batch at a time, [`borrow_batch`]; creditors busy with requests of
//! their own only when [`borrows_from_busy`] says so), else the newest running request at the
//! home yields its blocks and is recomputed later, so the oldest always progresses. A request
//! that yielded starts again only with room for its context ([`resume_blocks`]). Blocks on a
//! creditor that has become busy come home as blocks free up there ([`repatriation_room`]).

/// How one step's token budget is shared between requests.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepRule {
    /// Most tokens (decodes plus prefill chunks) in one step.
    pub max_batched_tokens: usize,
    /// A prompt with more tokens than this left to prefill is long: short ones go first.
    pub long_prefill_tokens: usize,
    /// The most of a step's budget one long prefill takes while other work wants the step.
    pub long_prefill_share: f64,
    /// The most attention (query, key) pairs one long prefill chunk does in a step shared with
    /// other work (0: no bound). A chunk's attention grows with the context before it, so at
    /// hundreds of thousands of tokens a token cap alone still makes steps that last a second,
    /// and every decode and short prompt at that worker (or borrowing from it) waits that long.
    pub long_prefill_pairs: u64,
}

impl Default for StepRule {
    fn default() -> Self {
        Self {
            max_batched_tokens: 512,
            long_prefill_tokens: 256,
            long_prefill_share: 0.5,
            // A 2,048-token chunk over a 14K context: tens of milliseconds on an H100.
            long_prefill_pairs: 32 << 20,
        }
    }
}

impl StepRule {
    /// The most tokens one long prefill takes in a step shared with other work.
    pub fn long_prefill_cap(&self) -> usize {
        ((self.max_batched_tokens as f64 * self.long_prefill_share) as usize).max(1)
    }

    fn is_long(&self, w: &Want) -> bool {
        !w.decode && w.pending > self.long_prefill_tokens
    }
}

/// What one request wants from the next step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Want {
    /// Tokens whose K/V is not in the cache yet.
    pub pending: usize,
    /// Its prompt is in the cache: it wants one token to decode.
    pub decode: bool,
    /// Tokens already in the cache, which a prefill chunk attends over.
    pub context: usize,
}

/// Shares a step's budget over `wants` (given oldest first): decodes first, then prefill chunks
/// of short prompts, then of long ones, each group in the order given; while anything else wants
/// the step, a long prefill takes at most [`StepRule::long_prefill_cap`] tokens, and no more
/// than [`StepRule::long_prefill_pairs`] of attention (at least a token), so short requests
/// stay fast beside long ones. A worker that `lends` never has a step to itself: its
/// borrowers' steps wait for its steps, so there a long prefill keeps within both bounds even
/// as the only request. Returns (index into `wants`, tokens) in serving order; requests that
/// get nothing this step are left out.
pub fn share_step(rule: &StepRule, wants: &[Want], lends: bool) -> Vec<(usize, usize)> {
    let group = |i: &usize| {
        let w = &wants[*i];
        match (w.decode, rule.is_long(w)) {
            (true, _) => 0,
            (false, false) => 1,
            (false, true) => 2,
        }
    };
    let mut order: Vec<usize> = (0..wants.len()).filter(|&i| wants[i].pending > 0).collect();
    // Stable: the order given holds within each group.
    order.sort_by_key(group);
    let contended = lends || order.len() > 1;
    let mut budget = rule.max_batched_tokens;
    let mut out = Vec::new();
    for i in order {
        if budget == 0 {
            break;
        }
        let w = &wants[i];
        let mut n = w.pending.min(budget);
        if contended && rule.is_long(w) {
            n = n.min(rule.long_prefill_cap());
            if rule.long_prefill_pairs > 0 {
                n = n
                    .min(pairs_chunk(rule.long_prefill_pairs, w.context))
                    .max(1);
            }
        }
        out.push((i, n));
        budget -= n;
    }
    out
}

/// The largest chunk `n` whose attention, n x (context + n) pairs, stays within `pairs`.
fn pairs_chunk(pairs: u64, context: usize) -> usize {
    let c = context as f64;
    (((c * c + 4.0 * pairs as f64).sqrt() - c) / 2.0) as usize
}

/// Blocks a request borrows in one round when it lacks `short` blocks and may grow by at most
/// `room` more blocks before its limit: a batch at a time, so neither a long prefill nor a
/// decode pays a round trip per block. Never less than it lacks.
pub const BORROW_BATCH_BLOCKS: usize = 8;

pub fn borrow_batch(short: usize, room: usize) -> usize {
    short.max(BORROW_BATCH_BLOCKS.min(room))
}

/// Whether a request may take blocks on creditors that serve requests of their own (idle
/// creditors lend to anyone). A borrower's every step waits for its creditors' steps, so a busy
/// creditor slows the borrower for as long as it holds the blocks. So only a request that
/// outgrows its home (its limit, prompt plus `max_tokens`, is more than the `home_blocks` its
/// home keeps for its own requests) or that is `starting` (it would otherwise wait in the queue
/// for its first token) borrows there; a running request that fits grows at home, where the
/// newest request yields to it, as on one instance.
pub fn borrows_from_busy(limit_blocks: usize, home_blocks: usize, starting: bool) -> bool {
    starting || limit_blocks > home_blocks
}

/// Whether the newest running request at a home yields its blocks to an older one there that
/// lacks a block nothing else can give (none free at home, none on creditors): yes, as in vLLM,
/// so the oldest progresses, except that a request that fits its home (its limit within the
/// `home_blocks` its home keeps for its own requests) never yields to one that outgrows it. A
/// request that fits is one a static instance serves too, and pooling must not make it slower
/// to serve what static refuses. The request that outgrows waits instead, for requests that
/// fit and finish without it (or for a loan); no two requests wait on each other.
pub fn yields_to(
    grower_limit_blocks: usize,
    newest_limit_blocks: usize,
    home_blocks: usize,
) -> bool {
    grower_limit_blocks <= home_blocks || newest_limit_blocks > home_blocks
}

/// Local blocks a home may take back from creditors that have become busy: a request holding
/// blocks on a creditor that now serves requests of its own waits for that creditor's steps at
/// every step of its own, for as long as the blocks stay there, so when blocks free up at home
/// they come back. Only what is spare: `free` less one block per `running` request (the
/// next token of each may need one) and the blocks of the next waiting request's first chunk
/// (`next_chunk_blocks`), so a move never makes a request yield or a waiting one wait longer.
pub fn repatriation_room(free: usize, running: usize, next_chunk_blocks: usize) -> usize {
    free.saturating_sub(running + next_chunk_blocks)
}

/// Blocks that must be free at home before a preempted request of `context_blocks` starts
/// again, on a home whose own requests can use `home_blocks` (its pool less what it lends):
/// room for its whole context, or the home to itself when its context is larger. So it does
/// not take back at once the blocks the request it yielded to grows into, and two homes that
/// borrow from each other do not trade the same blocks back and forth.
pub fn resume_blocks(context_blocks: usize, home_blocks: usize) -> usize {
    context_blocks.min(home_blocks)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(budget: usize) -> StepRule {
        StepRule {
            max_batched_tokens: budget,
            long_prefill_tokens: 100,
            long_prefill_share: 0.25,
            long_prefill_pairs: 0,
        }
    }

    fn prefill(pending: usize) -> Want {
        Want {
            pending,
            decode: false,
            context: 0,
        }
    }

    const DECODE: Want = Want {
        pending: 1,
        decode: true,
        context: 10,
    };

    #[test]
    fn decodes_go_first_then_short_prompts_then_long_ones() {
        let wants = [prefill(1000), prefill(20), DECODE, prefill(30), DECODE];
        let plan = share_step(&rule(512), &wants, false);
        assert_eq!(plan, [(2, 1), (4, 1), (1, 20), (3, 30), (0, 128)]);
    }

    #[test]
    fn a_long_prefill_alone_takes_the_whole_budget() {
        assert_eq!(share_step(&rule(512), &[prefill(1000)], false), [(0, 512)]);
    }

    #[test]
    fn the_budget_bounds_the_step_and_nothing_is_planned_empty() {
        let wants = [DECODE, prefill(0), prefill(90), prefill(50)];
        let plan = share_step(&rule(64), &wants, false);
        assert_eq!(plan, [(0, 1), (2, 63)]);
        assert_eq!(plan.iter().map(|p| p.1).sum::<usize>(), 64);
    }

    #[test]
    fn a_long_prefill_deep_in_its_context_takes_a_smaller_chunk_when_shared() {
        let rule = StepRule {
            long_prefill_pairs: 100 * 1100,
            ..rule(512)
        };
        let deep = Want {
            context: 1000,
            ..prefill(5000)
        };
        // 100 x (1000 + 100) pairs: the largest chunk within the bound.
        assert_eq!(
            share_step(&rule, &[DECODE, deep], false),
            [(0, 1), (1, 100)]
        );
        let shallow = Want {
            context: 10,
            ..prefill(5000)
        };
        assert_eq!(
            share_step(&rule, &[DECODE, shallow], false),
            [(0, 1), (1, 128)],
            "the token cap binds first"
        );
        assert_eq!(
            share_step(&rule, &[deep], false),
            [(0, 512)],
            "alone, it takes the step"
        );
        assert_eq!(
            share_step(&rule, &[deep], true),
            [(0, 100)],
            "never alone at a worker that lends"
        );
        let far = Want {
            context: 10_000_000,
            ..prefill(5000)
        };
        assert_eq!(
            share_step(&rule, &[DECODE, far], false),
            [(0, 1), (1, 1)],
            "always a token"
        );
    }

    #[test]
    fn borrowing_comes_in_batches_within_the_limit() {
        assert_eq!(borrow_batch(1, 100), BORROW_BATCH_BLOCKS);
        assert_eq!(borrow_batch(32, 100), 32, "a long chunk's whole need");
        assert_eq!(borrow_batch(1, 2), 2, "no further than the limit");
        assert_eq!(borrow_batch(3, 0), 3, "never less than it lacks");
    }

    #[test]
    fn busy_creditors_lend_to_requests_that_outgrow_their_home_or_are_starting() {
        assert!(!borrows_from_busy(64, 64, false), "fits: grows at home");
        assert!(borrows_from_busy(65, 64, false));
        assert!(
            borrows_from_busy(10, 64, true),
            "would wait for its first token"
        );
        assert!(
            borrows_from_busy(40, 32, false),
            "a home that lends keeps less for its own"
        );
    }

    #[test]
    fn a_request_that_fits_its_home_never_yields_to_one_that_outgrows_it() {
        assert!(yields_to(64, 10, 64), "both fit: the newest yields");
        assert!(yields_to(100, 80, 64), "both outgrow: the newest yields");
        assert!(
            yields_to(10, 100, 64),
            "one that outgrows yields to one that fits"
        );
        assert!(!yields_to(100, 10, 64), "one that fits keeps its blocks");
        assert!(
            !yields_to(40, 30, 32),
            "a home that lends keeps less for its own"
        );
    }

    #[test]
    fn a_preempted_request_waits_for_its_context_or_the_whole_home() {
        assert_eq!(resume_blocks(10, 64), 10);
        assert_eq!(resume_blocks(100, 64), 64);
    }

    #[test]
    fn blocks_come_home_only_from_what_running_and_waiting_requests_leave() {
        assert_eq!(repatriation_room(10, 2, 3), 5);
        assert_eq!(
            repatriation_room(4, 2, 3),
            0,
            "the next request's chunk comes first"
        );
        assert_eq!(repatriation_room(0, 0, 0), 0);
    }
}
