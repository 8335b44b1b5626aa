//! The simulated cluster: workers with KV pools of rBlocks and the cost model, fed by a trace.
//! The clock advances in fixed ticks; at each tick requests arrive and are dispatched,
//! queues admit, every worker's step time is taken from the cost model, requests progress by
//! the steps that fit in the tick, finished ones free their blocks, and (pooled) a placement
//! round runs every interval with the gManager's code.

use std::collections::VecDeque;
use std::time::Instant;

use infinite_llm_workload::trace::Request;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::gmanager::placement::{self, Creditors, Instance, PlacementConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Each worker alone: a request must fit in its home's pool.
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
    pub kv_tokens_per_worker: u64,
    pub block_tokens: u64,
    /// Share of its pool a worker lends (kvCache.lendFraction).
    pub lend_fraction: f64,
    /// Prompt tokens a worker prefills per step (chunked prefill).
    pub prefill_chunk_tokens: u64,
    pub tick_s: f64,
    pub placement_interval_s: f64,
    /// A request waiting longer than this is turned away.
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
    /// Completed requests too large for one worker's pool.
    pub completed_oversized: usize,
    /// Prompt and output tokens processed per second over the trace's duration.
    pub tokens_per_s: f64,
    /// Output tokens alone.
    pub output_tokens_per_s: f64,
    pub p50_latency_s: f64,
    pub p99_latency_s: f64,
    /// Mean wall time of one placement round (pooled only), and how many ran.
    pub placement_round_ms: f64,
    pub placement_rounds: usize,
    pub moved_blocks: u64,
}

struct Req {
    arrival_s: f64,
    prompt: u64,
    output: u64,
    need_blocks: u64,
    prefilled: f64,
    generated: f64,
    /// Blocks by holder, the home first.
    holders: Vec<(usize, u64)>,
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
    latencies: Vec<f64>,
    out: Outcome,
    round_s: f64,
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
            latencies: Vec::new(),
            out: Outcome::default(),
            round_s: 0.0,
        }
    }

    fn run(mut self, duration_s: f64) -> Outcome {
        let ticks = (duration_s / self.cfg.tick_s).ceil() as u64;
        let per_round = (self.cfg.placement_interval_s / self.cfg.tick_s)
            .round()
            .max(1.0) as u64;
        for tick in 0..ticks {
            let now = tick as f64 * self.cfg.tick_s;
            self.arrive(now + self.cfg.tick_s);
            if tick % per_round == 0 {
                self.time_out(now);
                if self.policy == Policy::Pooled {
                    self.placement_round();
                }
            }
            self.admit();
            self.step(now);
        }
        self.finish(duration_s)
    }

    fn pool_capacity(&self) -> u64 {
        let one = self.workers[0].total_blocks;
        match self.policy {
            Policy::Static => one,
            // The home's pool and what every other worker may lend under its watermark.
            Policy::Pooled => {
                let mark = (one as f64 * self.cfg.placement.high_watermark) as u64;
                let lend = self.workers[0].lend_cap.min(mark);
                one + lend * (self.workers.len() as u64 - 1)
            }
        }
    }

    /// Dispatches arrivals before `until` to the less loaded of two random workers (the
    /// same front door for both policies), or turns away those that can never fit.
    fn arrive(&mut self, until: f64) {
        let capacity = self.pool_capacity();
        while let Some(r) = self.trace.get(self.next_arrival) {
            if r.arrival_s >= until {
                break;
            }
            self.next_arrival += 1;
            self.out.arrived += 1;
            let tokens = r.prompt_tokens + r.output_tokens;
            let need_blocks = tokens.div_ceil(self.cfg.block_tokens);
            if need_blocks > capacity {
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
                need_blocks,
                prefilled: 0.0,
                generated: 0.0,
                holders: Vec::new(),
            });
            let w = &mut self.workers[home];
            w.queue.push_back(id);
            w.queued_blocks += need_blocks;
        }
    }

    fn time_out(&mut self, now: f64) {
        for w in &mut self.workers {
            let reqs = &self.reqs;
            let before = w.queue.len();
            w.queue
                .retain(|&r| now - reqs[r].arrival_s <= self.cfg.queue_timeout_s);
            self.out.rejected += before - w.queue.len();
            w.queued_blocks = w.queue.iter().map(|&r| reqs[r].need_blocks).sum();
        }
    }

    /// The workers as placement sees them; `with_requests` adds each home's requests.
    fn instances(&self, with_requests: bool) -> Vec<Instance> {
        let bt = self.cfg.block_tokens;
        let mut attention = vec![0u64; self.workers.len()];
        let mut remote = vec![false; self.workers.len()];
        for (home, w) in self.workers.iter().enumerate() {
            for &r in &w.running {
                let req = &self.reqs[r];
                let context = (req.prefilled + req.generated) as u64;
                for &(h, blocks) in &req.holders {
                    attention[h] += context * blocks / req.need_blocks;
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
                next_need_blocks: w.queue.front().map_or(0, |&r| self.reqs[r].need_blocks),
                attention_tokens: attention[i].min((w.used + w.lent) * bt),
                remote: remote[i],
                requests: if with_requests {
                    w.running
                        .iter()
                        .map(|&r| (r as u64, self.reqs[r].holders[0].1))
                        .collect()
                } else {
                    Vec::new()
                },
            })
            .collect()
    }

    /// Heads of queues start when their blocks can be placed: in their home's pool (static),
    /// or by the placement module's `place_new` over home and creditors (pooled).
    fn admit(&mut self) {
        match self.policy {
            Policy::Static => {
                for home in 0..self.workers.len() {
                    while let Some(&r) = self.workers[home].queue.front() {
                        let need = self.reqs[r].need_blocks;
                        if need > self.workers[home].free() {
                            break;
                        }
                        self.start(home, r, vec![(home, need)]);
                    }
                }
            }
            Policy::Pooled => {
                if self.workers.iter().all(|w| w.queue.is_empty()) {
                    return;
                }
                let mut instances = self.instances(false);
                let mut creditors = Creditors::new(&instances, &self.cfg.placement);
                for home in 0..self.workers.len() {
                    while let Some(&r) = self.workers[home].queue.front() {
                        let need = self.reqs[r].need_blocks;
                        let Some(placed) = placement::place_new(
                            &instances,
                            home,
                            need,
                            &mut creditors,
                            &self.cfg.placement,
                        ) else {
                            break;
                        };
                        for &(h, blocks) in &placed {
                            if h == home {
                                instances[h].used_blocks += blocks;
                            } else {
                                instances[h].lent_blocks += blocks;
                            }
                        }
                        instances[home].batch += 1;
                        self.start(home, r, placed);
                    }
                }
            }
        }
    }

    fn start(&mut self, home: usize, r: usize, placed: Vec<(usize, u64)>) {
        let w = &mut self.workers[home];
        w.queue.pop_front();
        w.queued_blocks -= self.reqs[r].need_blocks;
        w.running.push(r);
        for &(h, blocks) in &placed {
            if h == home {
                self.workers[h].used += blocks;
            } else {
                self.workers[h].lent += blocks;
            }
        }
        self.reqs[r].holders = placed;
    }

    /// One tick of serving: step times from the cost model, then progress.
    fn step(&mut self, now: f64) {
        let cost = &self.cfg.placement.cost;
        let chunk = self.cfg.prefill_chunk_tokens as f64;
        let n = self.workers.len();
        let mut attention_s = vec![0.0; n];
        let mut rows = vec![0.0; n];
        let mut remote = vec![false; n];
        // The first request still prefilling at each home gets the chunk; later ones wait.
        let mut prefilling = vec![usize::MAX; n];
        for (home, w) in self.workers.iter().enumerate() {
            for &r in &w.running {
                let req = &self.reqs[r];
                let context = req.prefilled + req.generated;
                let work = if req.prefilled < req.prompt as f64 {
                    if prefilling[home] != usize::MAX {
                        continue;
                    }
                    prefilling[home] = r;
                    let c = chunk.min(req.prompt as f64 - req.prefilled);
                    rows[home] += c;
                    c * (context + c / 2.0) * cost.attn_pair_s
                } else {
                    rows[home] += 1.0;
                    context * cost.attn_token_s
                };
                for &(h, blocks) in &req.holders {
                    attention_s[h] += work * blocks as f64 / req.need_blocks as f64;
                }
                remote[home] |= req.holders.len() > 1;
            }
        }
        for (i, w) in self.workers.iter_mut().enumerate() {
            let dense = if rows[i] > 0.0 {
                cost.dense_s(rows[i])
            } else {
                0.0
            };
            let wait = if remote[i] { cost.remote_step_s } else { 0.0 };
            w.step_s = dense + attention_s[i] + wait;
        }

        let tick = self.cfg.tick_s;
        for (home, &chunked) in prefilling.iter().enumerate() {
            if self.workers[home].running.is_empty() {
                continue;
            }
            // A home's step waits for the slowest creditor of any of its requests.
            let mut period = self.workers[home].step_s;
            for &r in &self.workers[home].running {
                for &(h, _) in &self.reqs[r].holders {
                    period = period.max(self.workers[h].step_s);
                }
            }
            let steps = tick / period;
            let mut done = Vec::new();
            for &r in &self.workers[home].running {
                let req = &mut self.reqs[r];
                if req.prefilled < req.prompt as f64 {
                    if chunked == r {
                        let add = (steps * chunk).min(req.prompt as f64 - req.prefilled);
                        req.prefilled += add;
                        self.tokens += add;
                    }
                } else {
                    let add = steps.min(req.output as f64 - req.generated);
                    req.generated += add;
                    self.tokens += add;
                    self.output_tokens += add;
                    if req.generated >= req.output as f64 {
                        done.push(r);
                    }
                }
            }
            for r in done {
                self.complete(home, r, now + tick);
            }
        }
    }

    fn complete(&mut self, home: usize, r: usize, at: f64) {
        let w = &mut self.workers[home];
        w.running.retain(|&x| x != r);
        let req = &self.reqs[r];
        for &(h, blocks) in &req.holders {
            if h == home {
                self.workers[h].used -= blocks;
            } else {
                self.workers[h].lent -= blocks;
            }
        }
        self.out.completed += 1;
        if req.need_blocks > self.workers[home].total_blocks {
            self.out.completed_oversized += 1;
        }
        self.latencies.push(at - req.arrival_s);
    }

    /// The gManager's greedy round over the simulated workers, timed; its moves take effect
    /// at once (copies overlap serving; the round's block budget is the link's rate).
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
    }

    fn finish(mut self, duration_s: f64) -> Outcome {
        self.out.tokens_per_s = self.tokens / duration_s;
        self.out.output_tokens_per_s = self.output_tokens / duration_s;
        self.latencies.sort_by(f64::total_cmp);
        let pick = |q: f64| {
            if self.latencies.is_empty() {
                return 0.0;
            }
            let i = ((self.latencies.len() - 1) as f64 * q).round() as usize;
            self.latencies[i]
        };
        self.out.p50_latency_s = pick(0.5);
        self.out.p99_latency_s = pick(0.99);
        if self.out.placement_rounds > 0 {
            self.out.placement_round_ms = self.round_s * 1e3 / self.out.placement_rounds as f64;
        }
        self.out
    }
}
