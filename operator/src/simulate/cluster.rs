//! The simulated cluster: instances with KV pools of rBlocks and the cost model, fed by a trace,
//! served by the worker's own policy (`infinite_llm_policy`). The clock advances in fixed ticks;
//! at each tick requests arrive and are dispatched, queues admit (a request starts with the
//! blocks of its first chunk), every instance shares its step by `share_step` and takes its
//! step time from the cost model, requests grow block by block as their tokens arrive (a free
//! local block, else, pooled, a batch on the creditors the placement code advises, else the
//! newest running request at that home yields and is recomputed later, unless it fits its home
//! and the one growing does not: that one waits), finished ones free
//! their blocks, homes take back what they hold on creditors that became busy as their own
//! blocks free up, and (pooled) a placement round runs every interval with the gManager's code.

use std::collections::VecDeque;
use std::time::Instant;

use infinite_llm_policy::{
    StepRule, Want, borrow_batch, borrows_from_busy, repatriation_room, resume_blocks, share_step,
    yields_to,
};
use infinite_llm_workload::trace::Request;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::gmanager::placement::{self, Creditors, Instance, PlacementConfig};

/// Prompts under this many tokens are short: their TTFT is reported apart.
pub const SHORT_PROMPT_TOKENS: u64 = 8192;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Each instance alone: a request's KV must fit in its home's pool.
    Static,
    /// Homes borrow from creditors; placement rounds move blocks.
    Pooled,
}

impl Policy {
    pub fn name(self) -> &'static str {
        match self {
            Policy::Static => "static",
            Policy::Pooled => "pooled",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub instances: usize,
    /// GPUs of one instance (tensor parallel when above one).
    pub gpus_per_instance: usize,
    pub kv_tokens_per_worker: u64,
    pub block_tokens: u64,
    /// Share of its pool a worker lends (kvCache.lendFraction).
    pub lend_fraction: f64,
    /// How a step's token budget is shared (the worker's scheduling rule).
    pub rule: StepRule,
    /// Most running requests per instance.
    pub max_num_seqs: usize,
    /// Added to every step of an instance: (seconds, seconds per token row), the tensor
    /// parallel all-reduces of an instance of several GPUs.
    pub step_overhead: (f64, f64),
    pub tick_s: f64,
    pub placement_interval_s: f64,
    /// A request that waits for blocks longer than this since it last progressed is turned
    /// away (the worker's retryable 503).
    pub queue_timeout_s: f64,
    pub placement: PlacementConfig,
    pub seed: u64,
}

/// What one run measured.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    pub arrived: usize,
    pub completed: usize,
    pub rejected: usize,
    /// Completed requests too large for one instance's pool.
    pub completed_oversized: usize,
    /// Prompt and output tokens processed per second over the trace's duration (recomputed
    /// tokens not counted).
    pub tokens_per_s: f64,
    /// Output tokens alone.
    pub output_tokens_per_s: f64,
    /// Prompt and output tokens of every request that arrived, per second over the trace's
    /// duration: the most any configuration can process, the roofline of `tokens_per_s`.
    pub offered_tokens_per_s: f64,
    pub p50_latency_s: f64,
    pub p99_latency_s: f64,
    /// Time to first token of requests with prompts under [`SHORT_PROMPT_TOKENS`].
    pub short_ttft_p50_s: f64,
    pub short_ttft_p99_s: f64,
    /// Requests that yielded their blocks to be recomputed.
    pub preemptions: u64,
    /// Mean wall time of one placement round (pooled only), and how many ran.
    pub placement_round_ms: f64,
    pub placement_rounds: usize,
    pub moved_blocks: u64,
}

struct Req {
    arrival_s: f64,
    prompt: u64,
    output: u64,
    /// Prompt plus output: the limit of its growth, in blocks.
    limit_blocks: u64,
    /// Tokens whose K/V is in the cache, of `target` to prefill (the prompt, or after a
    /// preemption the prompt and what it had generated).
    prefilled: f64,
    target: f64,
    generated: f64,
    /// Most prefill tokens ever counted, so a recompute is not counted twice.
    counted: f64,
    /// Blocks by holder, the home first.
    holders: Vec<(usize, u64)>,
    yielded: bool,
    progress_at: f64,
    first_token_s: Option<f64>,
}

impl Req {
    fn held(&self) -> u64 {
        self.holders.iter().map(|h| h.1).sum()
    }

    fn context(&self) -> f64 {
        if self.decoding() {
            self.prompt as f64 + self.generated
        } else {
            self.prefilled
        }
    }

    fn decoding(&self) -> bool {
        self.prefilled >= self.target
    }
}

#[derive(Default)]
struct Worker {
    total_blocks: u64,
    lend_cap: u64,
    used: u64,
    lent: u64,
    queue: VecDeque<usize>,
    queued_blocks: u64,
    running: Vec<usize>,
    step_s: f64,
}

impl Worker {
    fn free(&self) -> u64 {
        self.total_blocks - self.used - self.lent
    }
}

pub fn run(cfg: &ClusterConfig, policy: Policy, trace: &[Request], duration_s: f64) -> Outcome {
    Sim::new(cfg, policy, trace).run(duration_s)
}

struct Sim<'a> {
    cfg: &'a ClusterConfig,
    policy: Policy,
    trace: &'a [Request],
    rng: StdRng,
    workers: Vec<Worker>,
    reqs: Vec<Req>,
    next_arrival: usize,
    tokens: f64,
    output_tokens: f64,
    offered: f64,
    latencies: Vec<f64>,
    short_ttfts: Vec<f64>,
    out: Outcome,
    round_s: f64,
    /// Creditors as of the last placement round (pooled), taken from as homes borrow.
    creditors: Option<Creditors>,
}

impl<'a> Sim<'a> {
    fn new(cfg: &'a ClusterConfig, policy: Policy, trace: &'a [Request]) -> Self {
        let total_blocks = cfg.kv_tokens_per_worker / cfg.block_tokens;
        let workers = (0..cfg.instances)
            .map(|_| Worker {
                total_blocks,
                lend_cap: (total_blocks as f64 * cfg.lend_fraction) as u64,
                ..Default::default()
            })
            .collect();
        Sim {
            cfg,
            policy,
            trace,
            rng: StdRng::seed_from_u64(cfg.seed),
            workers,
            reqs: Vec::with_capacity(trace.len()),
            next_arrival: 0,
            tokens: 0.0,
            output_tokens: 0.0,
            offered: 0.0,
            latencies: Vec::new(),
            short_ttfts: Vec::new(),
            out: Outcome::default(),
            round_s: 0.0,
            creditors: None,
        }
    }

    fn run(mut self, duration_s: f64) -> Outcome {
        let ticks = (duration_s / self.cfg.tick_s).ceil() as u64;
        let per_round = (self.cfg.placement_interval_s / self.cfg.tick_s)
            .round()
            .max(1.0) as u64;
        for tick in 0..ticks {
            let now = tick as f64 * self.cfg.tick_s;
            self.arrive(now);
            if tick % per_round == 0 {
                self.time_out(now);
                if self.policy == Policy::Pooled {
                    self.placement_round();
                }
            }
            if self.policy == Policy::Pooled {
                self.repatriate();
            }
            self.admit(now);
            self.step(now);
        }
        self.finish(duration_s)
    }

    /// The longest request accepted, in blocks: one pool (static), or the home's and what
    /// every other instance may lend (pooled, the worker's configured maximum).
    fn pool_capacity(&self) -> u64 {
        let one = self.workers[0].total_blocks;
        match self.policy {
            Policy::Static => one,
            Policy::Pooled => one + self.workers[0].lend_cap * (self.workers.len() as u64 - 1),
        }
    }

    /// Dispatches arrivals up to `now` to the less loaded of two random instances (the same
    /// front door for both policies), or turns away those that can never fit. None is served
    /// before it arrives: the tick's work starts at `now`.
    fn arrive(&mut self, now: f64) {
        let capacity = self.pool_capacity();
        while let Some(r) = self.trace.get(self.next_arrival) {
            if r.arrival_s > now {
                break;
            }
            self.next_arrival += 1;
            self.out.arrived += 1;
            self.offered += (r.prompt_tokens + r.output_tokens) as f64;
            let limit_blocks = (r.prompt_tokens + r.output_tokens).div_ceil(self.cfg.block_tokens);
            if limit_blocks > capacity {
                self.out.rejected += 1;
                continue;
            }
            let n = self.workers.len();
            let a = self.rng.random_range(0..n);
            let b = self.rng.random_range(0..n);
            let load = |w: &Worker| w.free() as i64 - w.queued_blocks as i64;
            let home = if load(&self.workers[a]) >= load(&self.workers[b]) {
                a
            } else {
                b
            };
            let id = self.reqs.len();
            self.reqs.push(Req {
                arrival_s: r.arrival_s,
                prompt: r.prompt_tokens,
                output: r.output_tokens,
                limit_blocks,
                prefilled: 0.0,
                target: r.prompt_tokens as f64,
                generated: 0.0,
                counted: 0.0,
                holders: Vec::new(),
                yielded: false,
                progress_at: r.arrival_s,
                first_token_s: None,
            });
            let w = &mut self.workers[home];
            w.queue.push_back(id);
            w.queued_blocks += limit_blocks;
        }
    }

    fn time_out(&mut self, now: f64) {
        for w in &mut self.workers {
            let reqs = &self.reqs;
            let before = w.queue.len();
            w.queue
                .retain(|&r| now - reqs[r].progress_at <= self.cfg.queue_timeout_s);
            self.out.rejected += before - w.queue.len();
            w.queued_blocks = w.queue.iter().map(|&r| reqs[r].limit_blocks).sum();
        }
    }

    /// The instances as placement sees them; `with_requests` adds each home's requests.
    fn instances(&self, with_requests: bool) -> Vec<Instance> {
        let bt = self.cfg.block_tokens;
        let mut attention = vec![0u64; self.workers.len()];
        let mut remote = vec![false; self.workers.len()];
        for (home, w) in self.workers.iter().enumerate() {
            for &r in &w.running {
                let req = &self.reqs[r];
                let held = req.held().max(1);
                for &(h, blocks) in &req.holders {
                    attention[h] += req.context() as u64 * blocks / held;
                }
                remote[home] |= req.holders.len() > 1;
            }
        }
        self.workers
            .iter()
            .enumerate()
            .map(|(i, w)| Instance {
                total_blocks: w.total_blocks,
                used_blocks: w.used,
                lent_blocks: w.lent,
                lend_cap_blocks: w.lend_cap,
                batch: w.running.len() as u64,
                waiting: w.queue.len() as u64,
                next_need_blocks: self.next_chunk_blocks(i),
                attention_tokens: attention[i].min((w.used + w.lent) * bt),
                remote: remote[i],
                requests: if with_requests {
                    w.running
                        .iter()
                        .filter(|&&r| !self.reqs[r].holders.is_empty())
                        .map(|&r| (r as u64, self.reqs[r].holders[0].1))
                        .collect()
                } else {
                    Vec::new()
                },
            })
            .collect()
    }

    /// What a request wants from its home's next step.
    fn want(&self, r: usize) -> Want {
        let req = &self.reqs[r];
        if req.decoding() {
            Want {
                pending: 1,
                decode: true,
                context: req.context() as usize,
            }
        } else {
            Want {
                pending: (req.target - req.prefilled).ceil() as usize,
                decode: false,
                context: req.prefilled as usize,
            }
        }
    }

    /// Up to `n` more blocks for `r` at `home` (`starting`: for its first chunk): free local
    /// ones first, then (pooled) a batch on the advised creditors, busy ones only as
    /// [`borrows_from_busy`] allows. Returns how many it got.
    fn take_blocks(&mut self, home: usize, r: usize, n: u64, starting: bool) -> u64 {
        let local = n.min(self.workers[home].free());
        self.workers[home].used += local;
        self.add_holder(r, home, local);
        if local == n || self.policy == Policy::Static {
            return local;
        }
        let room = self.reqs[r]
            .limit_blocks
            .saturating_sub(self.reqs[r].held());
        let batch = borrow_batch((n - local) as usize, room as usize) as u64;
        let w = &self.workers[home];
        let busy_too = borrows_from_busy(
            self.reqs[r].limit_blocks as usize,
            (w.total_blocks - w.lent) as usize,
            starting,
        );
        let creditors = self
            .creditors
            .get_or_insert_with(|| Creditors::new(&[], &self.cfg.placement));
        let Some(lent) = creditors.take(batch, home, busy_too) else {
            return local;
        };
        for (c, k) in lent {
            self.workers[c].lent += k;
            self.add_holder(r, c, k);
        }
        n
    }

    fn add_holder(&mut self, r: usize, h: usize, k: u64) {
        if k == 0 {
            return;
        }
        let holders = &mut self.reqs[r].holders;
        match holders.iter_mut().find(|(w, _)| *w == h) {
            Some((_, b)) => *b += k,
            None => holders.push((h, k)),
        }
    }

    /// Frees a request's blocks wherever they are.
    fn release(&mut self, home: usize, r: usize) {
        for (h, blocks) in std::mem::take(&mut self.reqs[r].holders) {
            if h == home {
                self.workers[h].used -= blocks;
            } else {
                self.workers[h].lent -= blocks;
            }
        }
    }

    /// The newest running request at `home` yields its blocks and waits to be recomputed.
    fn preempt(&mut self, home: usize, r: usize, now: f64) {
        self.release(home, r);
        let w = &mut self.workers[home];
        w.running.retain(|&x| x != r);
        w.queue.push_front(r);
        w.queued_blocks += self.reqs[r].limit_blocks;
        let req = &mut self.reqs[r];
        req.target = req.prompt as f64 + req.generated;
        req.prefilled = 0.0;
        req.yielded = true;
        req.progress_at = req.progress_at.max(now);
        self.out.preemptions += 1;
    }

    /// Heads of queues start with their first chunk's blocks, in the order the step rule
    /// serves them (short prompts first); one that yielded waits for room for its context.
    fn admit(&mut self, now: f64) {
        let bt = self.cfg.block_tokens;
        for home in 0..self.workers.len() {
            let room = self
                .cfg
                .max_num_seqs
                .saturating_sub(self.workers[home].running.len());
            if room == 0 || self.workers[home].queue.is_empty() {
                continue;
            }
            let ids: Vec<usize> = self.workers[home]
                .queue
                .iter()
                .copied()
                .take(room)
                .collect();
            let wants: Vec<Want> = ids.iter().map(|&r| self.want(r)).collect();
            for (i, n) in share_step(&self.cfg.rule, &wants, self.workers[home].lent > 0) {
                let r = ids[i];
                let w = &self.workers[home];
                if self.reqs[r].yielded {
                    let context = (self.reqs[r].target as u64).div_ceil(bt);
                    if w.free()
                        < resume_blocks(context as usize, (w.total_blocks - w.lent) as usize) as u64
                    {
                        continue;
                    }
                }
                let chunk = (n as u64).div_ceil(bt);
                // The home first among its holders, whatever it holds.
                self.reqs[r].holders.push((home, 0));
                if self.take_blocks(home, r, chunk, true) < chunk {
                    self.release(home, r);
                    continue;
                }
                let w = &mut self.workers[home];
                w.queue.retain(|&x| x != r);
                w.queued_blocks -= self.reqs[r].limit_blocks;
                w.running.push(r);
                self.reqs[r].progress_at = now;
            }
        }
    }

    /// One tick of serving: each home's step shared by the step rule and timed by the cost
    /// model; requests grow by the blocks their new tokens need, oldest first, the newest
    /// yielding when nothing is left; then progress.
    fn step(&mut self, now: f64) {
        let cost = self.cfg.placement.cost.clone();
        let bt = self.cfg.block_tokens as f64;
        let n = self.workers.len();
        // Each home's step: (request, tokens a step) in serving order.
        let mut plans: Vec<Vec<(usize, usize)>> = Vec::with_capacity(n);
        for home in 0..n {
            let running = self.workers[home].running.clone();
            let wants: Vec<Want> = running.iter().map(|&r| self.want(r)).collect();
            plans.push(
                share_step(&self.cfg.rule, &wants, self.workers[home].lent > 0)
                    .into_iter()
                    .map(|(i, t)| (running[i], t))
                    .collect(),
            );
        }
        let mut attention_s = vec![0.0; n];
        let mut rows = vec![0.0; n];
        let mut remote = vec![false; n];
        for (home, plan) in plans.iter().enumerate() {
            for &(r, t) in plan {
                let req = &self.reqs[r];
                let context = req.context();
                let t = t as f64;
                rows[home] += t;
                let work = if req.decoding() {
                    context * cost.attn_token_s
                } else {
                    t * (context + t / 2.0) * cost.attn_pair_s
                };
                let held = req.held().max(1) as f64;
                for &(h, blocks) in &req.holders {
                    attention_s[h] += work * blocks as f64 / held;
                }
                remote[home] |= req.holders.len() > 1;
            }
        }
        let (fixed, per_row) = self.cfg.step_overhead;
        for (i, w) in self.workers.iter_mut().enumerate() {
            w.step_s = if rows[i] > 0.0 {
                let wait = if remote[i] { cost.remote_step_s } else { 0.0 };
                cost.dense_s(rows[i]) + fixed + per_row * rows[i] + attention_s[i] + wait
            } else {
                0.0
            };
        }

        let tick = self.cfg.tick_s;
        for (home, plan) in plans.into_iter().enumerate() {
            if plan.is_empty() {
                continue;
            }
            // A home's step waits for the slowest creditor of any of its requests.
            let mut period = self.workers[home].step_s;
            for &(r, _) in &plan {
                for &(h, _) in &self.reqs[r].holders {
                    period = period.max(self.workers[h].step_s);
                }
            }
            let steps = tick / period;
            let mut done = Vec::new();
            for (r, per_step) in plan {
                if !self.workers[home].running.contains(&r) {
                    continue;
                }
                let req = &self.reqs[r];
                let add = if req.decoding() {
                    steps.min(req.output as f64 - req.generated)
                } else {
                    (steps * per_step as f64).min(req.target - req.prefilled)
                };
                // Blocks for the new tokens: local, borrowed, or the newest yields (`yields_to`).
                let need = ((req.context() + add) / bt).ceil() as u64;
                let mut short = need.saturating_sub(req.held());
                while short > 0 {
                    short -= self.take_blocks(home, r, short, false);
                    if short == 0 {
                        break;
                    }
                    let reqs = &self.reqs;
                    let w = &self.workers[home];
                    let newest = *w
                        .running
                        .iter()
                        .max_by(|&&a, &&b| reqs[a].arrival_s.total_cmp(&reqs[b].arrival_s))
                        .expect("r is running");
                    let home_blocks = (w.total_blocks - w.lent) as usize;
                    let limit = |x: usize| reqs[x].limit_blocks as usize;
                    if newest != r && !yields_to(limit(r), limit(newest), home_blocks) {
                        break;
                    }
                    self.preempt(home, newest, now);
                    if newest == r {
                        break;
                    }
                }
                if short > 0 {
                    continue;
                }
                let req = &mut self.reqs[r];
                if req.decoding() {
                    req.generated += add;
                    self.tokens += add;
                    self.output_tokens += add;
                    if req.generated >= req.output as f64 {
                        done.push(r);
                    }
                } else {
                    let before = req.prefilled;
                    req.prefilled += add;
                    let counted = req.prefilled.max(req.counted);
                    self.tokens += counted - req.counted;
                    req.counted = counted;
                    if req.decoding() && req.first_token_s.is_none() {
                        // Within the tick: after the steps its last chunk took.
                        let took = ((req.target - before) / per_step as f64).ceil() * period;
                        req.first_token_s = Some(now + took.min(tick));
                    }
                }
                if add > 0.0 {
                    req.progress_at = now;
                }
            }
            for r in done {
                self.complete(home, r, now + tick);
            }
        }
    }

    fn complete(&mut self, home: usize, r: usize, at: f64) {
        self.workers[home].running.retain(|&x| x != r);
        self.release(home, r);
        let req = &self.reqs[r];
        self.out.completed += 1;
        if req.limit_blocks > self.workers[home].total_blocks {
            self.out.completed_oversized += 1;
        }
        self.latencies.push(at - req.arrival_s);
        if req.prompt < SHORT_PROMPT_TOKENS
            && let Some(first) = req.first_token_s
        {
            self.short_ttfts.push(first - req.arrival_s);
        }
    }

    /// The gManager's greedy round over the simulated instances, timed; its moves take effect
    /// at once (copies overlap serving; the round's block budget is the link's rate). The
    /// creditors it finds are those homes borrow from until the next round.
    fn placement_round(&mut self) {
        let started = Instant::now();
        let instances = self.instances(true);
        let moves = placement::plan_moves(&instances, self.cfg.block_tokens, &self.cfg.placement);
        self.round_s += started.elapsed().as_secs_f64();
        self.out.placement_rounds += 1;
        for m in moves {
            let r = m.request as usize;
            let req = &mut self.reqs[r];
            let local = &mut req.holders[0].1;
            let k = m.blocks.min(*local);
            *local -= k;
            match req.holders.iter_mut().find(|(h, _)| *h == m.to) {
                Some((_, b)) => *b += k,
                None => req.holders.push((m.to, k)),
            }
            self.workers[m.from].used -= k;
            self.workers[m.to].lent += k;
            self.out.moved_blocks += k;
        }
        self.creditors = Some(Creditors::new(&self.instances(false), &self.cfg.placement));
    }

    /// Homes take back, into their spare blocks ([`repatriation_room`]), the blocks their
    /// running requests hold on creditors that serve requests of their own, oldest request
    /// first (the worker does it between steps, a few blocks a step).
    fn repatriate(&mut self) {
        for home in 0..self.workers.len() {
            let w = &self.workers[home];
            let mut room = repatriation_room(
                w.free() as usize,
                w.running.len(),
                self.next_chunk_blocks(home) as usize,
            ) as u64;
            for r in self.workers[home].running.clone() {
                if room == 0 {
                    break;
                }
                let holders = &mut self.reqs[r].holders;
                for i in 1..holders.len() {
                    let (c, blocks) = holders[i];
                    if self.workers[c].running.is_empty() {
                        continue;
                    }
                    let k = blocks.min(room);
                    room -= k;
                    holders[i].1 -= k;
                    holders[0].1 += k;
                    self.workers[c].lent -= k;
                    self.workers[home].used += k;
                    self.out.moved_blocks += k;
                }
                holders.retain(|&(h, blocks)| blocks > 0 || h == home);
            }
        }
    }

    /// Blocks of the first chunk of the next request waiting at `home`.
    fn next_chunk_blocks(&self, home: usize) -> u64 {
        self.workers[home].queue.front().map_or(0, |&r| {
            let chunk = self.cfg.rule.max_batched_tokens as u64;
            self.reqs[r]
                .prompt
                .min(chunk)
                .div_ceil(self.cfg.block_tokens)
        })
    }

    fn finish(mut self, duration_s: f64) -> Outcome {
        self.out.tokens_per_s = self.tokens / duration_s;
        self.out.output_tokens_per_s = self.output_tokens / duration_s;
        self.out.offered_tokens_per_s = self.offered / duration_s;
        let pick = |v: &mut Vec<f64>, q: f64| {
            if v.is_empty() {
                return 0.0;
            }
            v.sort_by(f64::total_cmp);
            v[((v.len() - 1) as f64 * q).round() as usize]
        };
        self.out.p50_latency_s = pick(&mut self.latencies, 0.5);
        self.out.p99_latency_s = pick(&mut self.latencies, 0.99);
        self.out.short_ttft_p50_s = pick(&mut self.short_ttfts, 0.5);
        self.out.short_ttft_p99_s = pick(&mut self.short_ttfts, 0.99);
        if self.out.placement_rounds > 0 {
            self.out.placement_round_ms = self.round_s * 1e3 / self.out.placement_rounds as f64;
        }
        self.out
    }
}
