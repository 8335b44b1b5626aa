//! Placement: which workers are debtors and which creditors, where the blocks of a new request
//! go, and the paper's greedy loop that moves blocks of a debtor's longest request to the
//! creditor with the most spare blocks while a cost model says cluster throughput rises.
//!
//! Pure logic over [`Instance`] figures, so the gManager (figures from heartbeats) and the
//! simulator (figures from its model of workers) run the same code.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Hardware and model figures the cost model is derived from. The defaults are the H100 figures
/// of DESIGN.md §6 with the Llama-3-8B shape (32 layers, 32 query and 8 KV heads of 128, bf16);
/// a JSON file of the same field names (`--cost-model`) replaces any of them with figures
/// measured on the cluster's own GPUs and model.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Measured {
    /// GPU memory: H100 80GB.
    pub hbm_bytes: f64,
    /// Share of memory the worker takes (kvCache.gpuMemoryFraction default).
    pub memory_fraction: f64,
    /// Working memory for activations and the allocator; an assumption, not measured.
    pub activation_bytes: f64,
    /// Parameters: Llama-3-8B.
    pub params: f64,
    /// Bytes per parameter (bf16).
    pub bytes_per_param: f64,
    /// K and V of one token over all layers: 2 * 32 layers * 8 KV heads * 128 * 2 bytes.
    pub kv_bytes_per_token: f64,
    /// FLOPs per (query, key) pair in prefill attention: 4 * 32 layers * 32 heads * 128.
    pub attn_flops_per_pair: f64,
    pub layers: f64,
    /// Device copy bandwidth, DESIGN.md §6: 3.0 TB/s; bounds the weight read per step.
    pub mem_bytes_per_s: f64,
    /// Decode attention KV read rate, DESIGN.md §6: SDPA 2.5-3.0 TB/s (midpoint).
    pub kv_read_bytes_per_s: f64,
    /// bf16 GEMM rate, DESIGN.md §6: 780 TFLOP/s.
    pub flops: f64,
    /// NCCL round trip for a small message, DESIGN.md §6: 53-73 us (midpoint), paid per layer
    /// by a home waiting on creditors, counted as if nothing overlapped it.
    pub layer_round_trip_s: f64,
    /// One-way link rate for moving blocks, DESIGN.md §6: 368 GB/s.
    pub link_bytes_per_s: f64,
    /// Width of a token row (Llama-3-8B: 4096): what a tensor-parallel all-reduce carries.
    pub hidden_size: f64,
}

impl Default for Measured {
    fn default() -> Self {
        Measured {
            hbm_bytes: 80.0 * 1024.0 * 1024.0 * 1024.0,
            memory_fraction: 0.9,
            activation_bytes: 2.0 * 1024.0 * 1024.0 * 1024.0,
            params: 8.03e9,
            bytes_per_param: 2.0,
            kv_bytes_per_token: 2.0 * 32.0 * 8.0 * 128.0 * 2.0,
            attn_flops_per_pair: 4.0 * 32.0 * 32.0 * 128.0,
            layers: 32.0,
            mem_bytes_per_s: 3.0e12,
            kv_read_bytes_per_s: 2.75e12,
            flops: 780e12,
            layer_round_trip_s: 63e-6,
            link_bytes_per_s: 368e9,
            hidden_size: 4096.0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CostModelError {
    #[error("reading the cost model {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the cost model {path} is not valid: {source}")]
    Parse {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the cost model {path}: {field} must be a positive number, not {value}")]
    NotPositive {
        path: String,
        field: &'static str,
        value: f64,
    },
}

impl Measured {
    /// The figures of a JSON file; the fields it leaves out keep their defaults.
    pub fn from_file(path: &std::path::Path) -> Result<Self, CostModelError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| CostModelError::Read {
            path: shown.clone(),
            source,
        })?;
        let m: Measured = serde_json::from_str(&text).map_err(|source| CostModelError::Parse {
            path: shown.clone(),
            source,
        })?;
        let fields = [
            ("hbm_bytes", m.hbm_bytes),
            ("memory_fraction", m.memory_fraction),
            ("params", m.params),
            ("bytes_per_param", m.bytes_per_param),
            ("kv_bytes_per_token", m.kv_bytes_per_token),
            ("attn_flops_per_pair", m.attn_flops_per_pair),
            ("layers", m.layers),
            ("mem_bytes_per_s", m.mem_bytes_per_s),
            ("kv_read_bytes_per_s", m.kv_read_bytes_per_s),
            ("flops", m.flops),
            ("link_bytes_per_s", m.link_bytes_per_s),
            ("hidden_size", m.hidden_size),
        ];
        // A zero or negative rate would divide the cost model by zero; these two may be 0.
        let may_be_zero = [
            ("activation_bytes", m.activation_bytes),
            ("layer_round_trip_s", m.layer_round_trip_s),
        ];
        let bad = fields
            .iter()
            .find(|(_, v)| !(v.is_finite() && *v > 0.0))
            .or_else(|| {
                may_be_zero
                    .iter()
                    .find(|(_, v)| !(v.is_finite() && *v >= 0.0))
            });
        match bad {
            Some(&(field, value)) => Err(CostModelError::NotPositive {
                path: shown,
                field,
                value,
            }),
            None => Ok(m),
        }
    }

    /// KV tokens one worker holds once the weights and working memory are in.
    pub fn kv_capacity_tokens(&self) -> u64 {
        let weights = self.params * self.bytes_per_param;
        let kv = self.hbm_bytes * self.memory_fraction - weights - self.activation_bytes;
        (kv.max(0.0) / self.kv_bytes_per_token) as u64
    }

    /// Blocks of `block_tokens` one link moves in `seconds`.
    pub fn movable_blocks(&self, block_tokens: u64, seconds: f64) -> u64 {
        let block = self.kv_bytes_per_token * block_tokens as f64;
        (self.link_bytes_per_s * seconds / block) as u64
    }

    pub fn cost_model(&self) -> CostModel {
        CostModel {
            weight_read_s: self.params * self.bytes_per_param / self.mem_bytes_per_s,
            dense_token_s: 2.0 * self.params / self.flops,
            attn_token_s: self.kv_bytes_per_token / self.kv_read_bytes_per_s,
            attn_pair_s: self.attn_flops_per_pair / self.flops,
            remote_step_s: self.layers * self.layer_round_trip_s,
        }
    }
}

/// Time of one step, the paper's T(batch, S) = W(batch)/f(batch) + sum_r S_r/g(S): dense work
/// at the rate it achieves at that batch, plus attention at the KV read rate.
#[derive(Debug, Clone, PartialEq)]
pub struct CostModel {
    /// Dense work of a small batch: one read of the weights.
    pub weight_read_s: f64,
    /// Dense work per token row once the batch is compute-bound.
    pub dense_token_s: f64,
    /// Decode attention per token of context.
    pub attn_token_s: f64,
    /// Prefill attention per (query, key) pair.
    pub attn_pair_s: f64,
    /// Added to the step of a home with any request whose blocks live elsewhere.
    pub remote_step_s: f64,
}

impl Default for CostModel {
    fn default() -> Self {
        Measured::default().cost_model()
    }
}

impl CostModel {
    /// W(rows)/f(rows): memory-bound on the weights until compute-bound.
    pub fn dense_s(&self, rows: f64) -> f64 {
        self.weight_read_s.max(rows * self.dense_token_s)
    }

    /// One decode step of `batch` requests attending over `context_tokens` in all.
    pub fn decode_step_s(&self, batch: f64, context_tokens: f64, remote: bool) -> f64 {
        let wait = if remote { self.remote_step_s } else { 0.0 };
        self.dense_s(batch) + context_tokens * self.attn_token_s + wait
    }

    /// Decode tokens per second of that step.
    pub fn decode_rate(&self, batch: f64, context_tokens: f64, remote: bool) -> f64 {
        if batch <= 0.0 {
            return 0.0;
        }
        batch / self.decode_step_s(batch, context_tokens, remote)
    }

    /// The batch from which dense work is compute-bound: below it, a bigger batch is free.
    pub fn saturating_batch(&self) -> u64 {
        (self.weight_read_s / self.dense_token_s).ceil() as u64
    }
}

/// Policy knobs of placement.
#[derive(Debug, Clone, PartialEq)]
pub struct PlacementConfig {
    pub cost: CostModel,
    /// A worker whose memory cannot take its next waiting request is a debtor while its batch
    /// is below this; at or above it, more batch would not be cheaper per token.
    pub debtor_max_batch: u64,
    /// Share of its pool up to which a creditor lends (kvCache.highWatermark): the rest stays
    /// for the creditor's own arrivals.
    pub high_watermark: f64,
    /// Relative throughput gain a move must promise.
    pub min_gain: f64,
    /// Blocks one round may move in all (the migration rate limit).
    pub max_round_blocks: u64,
}

impl Default for PlacementConfig {
    fn default() -> Self {
        Self::for_measured(&Measured::default())
    }
}

impl PlacementConfig {
    /// The policy's defaults with the cost model and move budget of `measured`.
    pub fn for_measured(measured: &Measured) -> Self {
        let cost = measured.cost_model();
        PlacementConfig {
            debtor_max_batch: cost.saturating_batch(),
            cost,
            high_watermark: 0.9,
            min_gain: 0.01,
            // What the link moves in a second, the default round interval.
            max_round_blocks: measured.movable_blocks(16, 1.0),
        }
    }
}

/// One worker as placement sees it. Blocks held for the worker's own requests are `used`,
/// for other workers' requests `lent`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Instance {
    pub total_blocks: u64,
    pub used_blocks: u64,
    pub lent_blocks: u64,
    pub lend_cap_blocks: u64,
    /// Running requests.
    pub batch: u64,
    pub waiting: u64,
    /// Blocks the next waiting request needs (an estimate where it is not reported).
    pub next_need_blocks: u64,
    /// Tokens of context this worker attends over each step, its own and lent.
    pub attention_tokens: u64,
    /// Whether a running request of this worker already has blocks elsewhere.
    pub remote: bool,
    /// This worker's requests and how many of their blocks it holds itself.
    pub requests: Vec<(u64, u64)>,
}

impl Instance {
    pub fn free_blocks(&self) -> u64 {
        self.total_blocks
            .saturating_sub(self.used_blocks + self.lent_blocks)
    }

    /// Blocks the worker could lend now: free, under its lend cap.
    pub fn lendable_blocks(&self) -> u64 {
        self.free_blocks()
            .min(self.lend_cap_blocks.saturating_sub(self.lent_blocks))
    }

    /// Blocks the worker lends without going above the high watermark.
    pub fn spare_blocks(&self, cfg: &PlacementConfig) -> u64 {
        let mark = (self.total_blocks as f64 * cfg.high_watermark).floor() as u64;
        self.lendable_blocks()
            .min(mark.saturating_sub(self.used_blocks + self.lent_blocks))
    }

    fn decode_rate(&self, cost: &CostModel) -> f64 {
        cost.decode_rate(self.batch as f64, self.attention_tokens as f64, self.remote)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Memory-bound with a small batch: its queue waits for memory, not compute.
    Debtor,
    /// Has spare blocks and nobody waiting.
    Creditor,
    Balanced,
}

pub fn role(i: &Instance, cfg: &PlacementConfig) -> Role {
    if i.waiting > 0 && i.free_blocks() < i.next_need_blocks && i.batch < cfg.debtor_max_batch {
        Role::Debtor
    } else if i.waiting == 0 && i.spare_blocks(cfg) > 0 {
        Role::Creditor
    } else {
        Role::Balanced
    }
}

/// Workers other than `home` that lend at all (a lend cap; a draining one has none), most
/// lendable now first (ties keep slice order). Those with nothing free stay on the list, last:
/// asked for an older request, their newer requests yield or their loans are called back
/// (wound-wait), so the oldest request in the pool can always grow. This is borrow advice for a
/// home that must borrow at once, so the watermark does not apply.
pub fn rank_lenders(instances: &[Instance], home: usize) -> Vec<usize> {
    let mut ranked: Vec<usize> = (0..instances.len())
        .filter(|&i| i != home && instances[i].lend_cap_blocks > 0)
        .collect();
    ranked.sort_by_key(|&i| Reverse(instances[i].lendable_blocks()));
    ranked
}

/// Creditors by spare blocks, most first (ties by index). Taking from one lowers its spare, so
/// one queue serves many placements of a round without handing out a block twice.
#[derive(Debug, Clone)]
pub struct Creditors {
    heap: BinaryHeap<(u64, Reverse<usize>)>,
    /// By instance: serves no request of its own.
    idle: Vec<bool>,
}

impl Creditors {
    pub fn new(instances: &[Instance], cfg: &PlacementConfig) -> Self {
        let heap = instances
            .iter()
            .enumerate()
            .filter(|(_, c)| role(c, cfg) == Role::Creditor)
            .map(|(i, c)| (c.spare_blocks(cfg), Reverse(i)))
            .collect();
        let idle = instances.iter().map(|c| c.batch == 0).collect();
        Creditors { heap, idle }
    }

    /// `need` blocks from the creditors with most spare blocks, never from `home`, and from
    /// creditors busy with requests of their own only if `busy_too`: all or nothing.
    pub fn take(&mut self, need: u64, home: usize, busy_too: bool) -> Option<Vec<(usize, u64)>> {
        let mut taken = Vec::new();
        let mut skipped = Vec::new();
        let mut left = need;
        while left > 0 {
            let Some((spare, Reverse(c))) = self.heap.pop() else {
                break;
            };
            if c == home || !(busy_too || self.idle[c]) {
                skipped.push((spare, Reverse(c)));
                continue;
            }
            let k = spare.min(left);
            taken.push((c, k));
            left -= k;
            if spare > k {
                skipped.push((spare - k, Reverse(c)));
            }
        }
        self.heap.extend(skipped);
        if left > 0 {
            self.give_back(&taken);
            return None;
        }
        Some(taken)
    }

    /// Returns blocks taken but not used.
    pub fn give_back(&mut self, taken: &[(usize, u64)]) {
        for &(c, k) in taken {
            let entry = self.heap.iter().find(|(_, Reverse(i))| *i == c).copied();
            let spare = match entry {
                Some(e) => {
                    self.heap.retain(|x| *x != e);
                    e.0
                }
                None => 0,
            };
            self.heap.push((spare + k, Reverse(c)));
        }
    }
}

/// `blocks` of `request`, homed at `from`, go to `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    pub request: u64,
    pub from: usize,
    pub to: usize,
    pub blocks: u64,
}

/// One round of the greedy loop. Debtors, smallest batch first, each take the blocks their next
/// waiting request lacks by moving blocks of their longest requests to the idle creditors with
/// the most spare blocks; a debtor's moves are kept only when the cost model says the debtor
/// decodes faster afterwards. Moves never exceed a creditor's spare blocks as given, nor
/// `max_round_blocks` in all.
pub fn plan_moves(instances: &[Instance], block_tokens: u64, cfg: &PlacementConfig) -> Vec<Move> {
    let mut debtors: Vec<usize> = (0..instances.len())
        .filter(|&i| role(&instances[i], cfg) == Role::Debtor)
        .collect();
    if debtors.is_empty() {
        return Vec::new();
    }
    debtors.sort_by_key(|&i| (instances[i].batch, i));
    let mut creditors = Creditors::new(instances, cfg);
    let mut moves = Vec::new();
    let mut budget = cfg.max_round_blocks;
    for d in debtors {
        let debtor = &instances[d];
        let lack = debtor.next_need_blocks - debtor.free_blocks();
        let movable: u64 = debtor.requests.iter().map(|&(_, local)| local).sum();
        if lack > budget || lack > movable {
            continue;
        }
        // Only onto idle creditors: a moved request's every step would wait for a busy one's.
        let Some(taken) = creditors.take(lack, d, false) else {
            continue;
        };
        let mut requests: Vec<(u64, u64)> = debtor
            .requests
            .iter()
            .copied()
            .filter(|&(_, local)| local > 0)
            .collect();
        requests.sort_by_key(|&(id, local)| (Reverse(local), id));
        let planned = split(&requests, &taken, d);
        if gains(debtor, &planned, block_tokens, cfg) {
            budget -= lack;
            moves.extend(planned);
        } else {
            creditors.give_back(&taken);
        }
    }
    moves
}

/// Pairs the debtor's requests, longest first, with the blocks taken from creditors.
fn split(requests: &[(u64, u64)], taken: &[(usize, u64)], from: usize) -> Vec<Move> {
    let mut moves = Vec::new();
    let mut reqs = requests.iter().copied();
    let mut current = reqs.next();
    for &(to, mut blocks) in taken {
        while blocks > 0 {
            let Some((request, local)) = current else {
                return moves;
            };
            let k = blocks.min(local);
            moves.push(Move {
                request,
                from,
                to,
                blocks: k,
            });
            blocks -= k;
            current = if local > k {
                Some((request, local - k))
            } else {
                reqs.next()
            };
        }
    }
    moves
}

/// Context tokens that `blocks` of the debtor's blocks hold, at its average fill.
fn moved_tokens(debtor: &Instance, blocks: u64, block_tokens: u64) -> u64 {
    let held = (debtor.used_blocks + debtor.lent_blocks) * block_tokens;
    if held == 0 {
        return 0;
    }
    let fill = (debtor.attention_tokens as f64 / held as f64).min(1.0);
    (blocks as f64 * block_tokens as f64 * fill) as u64
}

/// Whether the debtor, admitting its next waiting request once the moves free its memory and
/// waiting each step on the creditors (idle ones, which run nothing of their own to slow it),
/// decodes faster than before.
fn gains(debtor: &Instance, moves: &[Move], block_tokens: u64, cfg: &PlacementConfig) -> bool {
    let cost = &cfg.cost;
    let moved: u64 = moves
        .iter()
        .map(|m| moved_tokens(debtor, m.blocks, block_tokens))
        .sum();
    let before = debtor.decode_rate(cost);
    let admitted = debtor.next_need_blocks * block_tokens;
    let debtor_tokens = (debtor.attention_tokens - moved.min(debtor.attention_tokens)) as f64;
    let after = cost.decode_rate(
        (debtor.batch + 1) as f64,
        debtor_tokens + admitted as f64,
        true,
    );
    after > before * (1.0 + cfg.min_gain)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cost_file(json: &str) -> Result<Measured, CostModelError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cost.json");
        std::fs::write(&path, json).unwrap();
        Measured::from_file(&path)
    }

    #[test]
    fn a_cost_model_file_replaces_the_figures_it_names() {
        let m = cost_file(r#"{"mem_bytes_per_s": 4.8e12, "hbm_bytes": 1.5e11}"#).unwrap();
        assert_eq!(m.mem_bytes_per_s, 4.8e12);
        assert_eq!(m.hbm_bytes, 1.5e11);
        assert_eq!(m.flops, Measured::default().flops);
        // A faster memory reads the weights sooner, and a bigger one holds more KV.
        let (cfg, default) = (
            PlacementConfig::for_measured(&m),
            PlacementConfig::default(),
        );
        assert!(cfg.cost.weight_read_s < default.cost.weight_read_s);
        assert!(m.kv_capacity_tokens() > Measured::default().kv_capacity_tokens());
    }

    #[test]
    fn a_bad_cost_model_file_is_refused_with_the_reason() {
        let unknown = cost_file(r#"{"mem_bandwidth": 4.8e12}"#)
            .unwrap_err()
            .to_string();
        assert!(unknown.contains("mem_bandwidth"), "{unknown}");
        let zero = cost_file(r#"{"flops": 0}"#).unwrap_err().to_string();
        assert!(zero.contains("flops must be a positive number"), "{zero}");
        let missing = Measured::from_file(std::path::Path::new("/nonexistent/cost.json"));
        assert!(matches!(missing, Err(CostModelError::Read { .. })));
    }

    fn worker(total: u64, used: u64, batch: u64, waiting: u64) -> Instance {
        Instance {
            total_blocks: total,
            used_blocks: used,
            lend_cap_blocks: total / 2,
            batch,
            waiting,
            attention_tokens: used * 16,
            ..Default::default()
        }
    }

    #[test]
    fn the_default_cost_model_follows_the_measured_anchors() {
        let m = Measured::default();
        let c = m.cost_model();
        // The weight-read roofline at batch 1 is about 187 tok/s (DESIGN.md §6).
        assert!((1.0 / c.weight_read_s - 187.0).abs() < 2.0, "{c:?}");
        // Dense work is memory-bound at batch 1 and compute-bound at a large batch.
        assert_eq!(c.dense_s(1.0), c.weight_read_s);
        assert!(c.dense_s(1000.0) > c.weight_read_s);
        // Llama-3-8B: 128 KiB of KV per token; an H100 holds some 450K tokens besides weights.
        assert_eq!(m.kv_bytes_per_token, 131072.0);
        let cap = m.kv_capacity_tokens();
        assert!((400_000..500_000).contains(&cap), "{cap}");
        // A longer context makes a step slower, a bigger batch makes it cheaper per token.
        assert!(c.decode_step_s(8.0, 1e6, false) > c.decode_step_s(8.0, 1e5, false));
        assert!(c.decode_rate(32.0, 1e5, false) > c.decode_rate(1.0, 1e5, false));
    }

    #[test]
    fn roles_follow_memory_queue_and_batch() {
        let cfg = PlacementConfig::default();
        let mut full = worker(100, 95, 2, 3);
        full.next_need_blocks = 10;
        assert_eq!(role(&full, &cfg), Role::Debtor);
        full.batch = cfg.debtor_max_batch;
        assert_eq!(
            role(&full, &cfg),
            Role::Balanced,
            "a big batch is no debtor"
        );
        let idle = worker(100, 10, 1, 0);
        assert_eq!(role(&idle, &cfg), Role::Creditor);
        let at_mark = worker(100, 90, 1, 0);
        assert_eq!(role(&at_mark, &cfg), Role::Balanced, "the watermark binds");
        let mut queued = worker(100, 10, 1, 1);
        queued.next_need_blocks = 5;
        assert_eq!(
            role(&queued, &cfg),
            Role::Balanced,
            "it can admit on its own"
        );
    }

    #[test]
    fn lenders_rank_by_lendable_blocks_without_the_home() {
        let mut draining = worker(100, 0, 0, 0);
        draining.lend_cap_blocks = 0;
        let ws = [
            worker(100, 0, 0, 0),
            worker(100, 90, 0, 0),
            worker(100, 10, 0, 0),
            worker(100, 100, 1, 0),
            draining,
        ];
        assert_eq!(rank_lenders(&ws, 0), [2, 1, 3], "a full worker last");
        assert_eq!(rank_lenders(&ws, 2), [0, 1, 3]);
    }

    #[test]
    fn a_memory_bound_debtor_moves_its_longest_request_to_an_idle_creditor() {
        let cfg = PlacementConfig::default();
        let mut debtor = worker(10_000, 10_000, 2, 5);
        debtor.requests = vec![(1, 2_000), (2, 8_000)];
        debtor.next_need_blocks = 500;
        let mut busy = worker(10_000, 1_000, 30, 0);
        busy.requests = vec![(3, 1_000)];
        let idle = worker(10_000, 6_000, 0, 0);
        let ws = [debtor, busy, idle];
        assert!(ws[1].spare_blocks(&cfg) > ws[2].spare_blocks(&cfg));
        let moves = plan_moves(&ws, 16, &cfg);
        assert_eq!(
            moves,
            [Move {
                request: 2,
                from: 0,
                to: 2,
                blocks: 500
            }],
            "the freer creditor is busy: every step of the moved request would wait for its"
        );
        assert!(plan_moves(&ws[..2], 16, &cfg).is_empty());
    }

    #[test]
    fn no_move_when_the_cost_model_says_throughput_falls() {
        let cfg = PlacementConfig::default();
        // A debtor with a batch of 100: one more request gains 1% of rows, and waiting on a
        // creditor every step costs more than that.
        let mut debtor = worker(10_000, 10_000, 100, 1);
        debtor.requests = vec![(1, 10_000)];
        debtor.next_need_blocks = 4_000;
        let mut creditor = worker(10_000, 0, 0, 0);
        creditor.lend_cap_blocks = 10_000;
        assert!(plan_moves(&[debtor.clone(), creditor.clone()], 16, &cfg).is_empty());
        // With a batch of one, the next request nearly doubles its rows.
        debtor.batch = 1;
        assert_eq!(plan_moves(&[debtor, creditor], 16, &cfg).len(), 1);
    }

    #[test]
    fn moves_respect_spare_blocks_and_the_round_budget() {
        let mut cfg = PlacementConfig::default();
        let mut ws = Vec::new();
        for r in 0..4 {
            let mut d = worker(1_000, 1_000, 1, 1);
            d.requests = vec![(r, 1_000)];
            d.next_need_blocks = 300;
            ws.push(d);
        }
        ws.push(worker(1_000, 0, 0, 0));
        ws.push(worker(1_000, 0, 0, 0));
        let moves = plan_moves(&ws, 16, &cfg);
        let mut to = [0u64; 6];
        for m in &moves {
            assert!(m.from < 4 && m.to >= 4);
            to[m.to] += m.blocks;
        }
        assert!(to[4] <= ws[4].spare_blocks(&cfg) && to[5] <= ws[5].spare_blocks(&cfg));
        // 2 creditors with 500 spare each cover three debtors of 300.
        assert_eq!(moves.iter().map(|m| m.blocks).sum::<u64>(), 900);
        cfg.max_round_blocks = 650;
        let capped = plan_moves(&ws, 16, &cfg);
        assert_eq!(capped.iter().map(|m| m.blocks).sum::<u64>(), 600);
    }
}
