//! The engine loop: one OS thread that runs model steps over the running batch, fed by a queue.
//!
//! The HTTP side talks to it through `EngineHandle`: a request goes in over a channel and its
//! tokens come back over a per-request channel. The thread notices a dropped receiver before each
//! step and frees that request's blocks at once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc as std_mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use infinite_llm_policy::StepRule;
use infinite_llm_protocol::gmanager::{Creditor, PlannedMove};
use infinite_llm_protocol::secret::Secret;

use tokio::sync::{mpsc, watch};

use crate::backend::Backend;
use crate::backend::cpu::Cpu;
use crate::backend::cuda::Cuda;
use crate::cluster_link::{ClusterLink, LayerExchange};
use crate::creditor::{KvWork, serve_home, serve_kv};
use crate::inbox::{Inbox, Submitted};
use crate::liveness::Liveness;
use crate::migrator::{Ctx, Migrator};
use crate::model::llama::{Exchange, Llama, NoExchange};
use crate::peer::frame_checks::{FrameLimits, Rejects};
use crate::peer::tcp::{Guard, TcpPeers};
use crate::peer::{Incoming, PeerMsg, Transport};
use crate::rblock_pool::Holder;
use crate::request::{Event, FinishReason, GenerateRequest, SubmitError};
use crate::rmanager::{LoanKey, RManager};
use crate::sampling::{RowDraw, Sampler};
use crate::scheduler::{Scheduler, SchedulerConfig, SeqId};

/// How long a stalled engine sleeps on its inbox before it looks again.
const IDLE_WAIT: Duration = Duration::from_millis(20);
/// How often an idle engine looks at direct links that are coming up.
const LINK_POLL: Duration = Duration::from_millis(20);

/// A snapshot of what the engine is doing, read by `/metrics` and `/ready`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub running: usize,
    pub waiting: usize,
    pub kv_blocks_total: usize,
    pub kv_blocks_used: usize,
    /// Local blocks held for other workers' requests.
    pub kv_blocks_lent: usize,
    /// Blocks other workers hold for this worker's requests.
    pub kv_blocks_borrowed: usize,
    pub kv_blocks_lend_cap: usize,
    /// Blocks borrowed since start.
    pub kv_borrow_total: u64,
    /// Reservations creditors refused since start.
    pub kv_borrow_refusals_total: u64,
    pub preemptions_total: u64,
    /// Blocks recomputed from token ids because the creditor holding them was lost, or
    /// drained while nowhere had room for them.
    pub kv_recomputed_blocks_total: u64,
    /// Blocks of this worker's requests copied to another holder since start.
    pub kv_migrated_blocks_total: u64,
    /// Requests whose blocks are being moved.
    pub migrations_in_flight: usize,
    /// Connections to creditors lost since start.
    pub peer_losses_total: u64,
    /// Creditor connections with a direct device link up.
    pub peer_direct_links: usize,
    /// Takes no new requests and lends nothing more; exits once nothing depends on it.
    pub draining: bool,
}

/// How the engine is sized. The worker's flags map onto this one to one.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Tokens per rBlock.
    pub block_tokens: usize,
    /// Size of the KV pool in rBlocks (`None`: as many as `kv_memory_bytes` holds).
    pub kv_blocks: Option<usize>,
    /// Memory for the KV pool when `kv_blocks` is not given.
    pub kv_memory_bytes: usize,
    /// Where the model runs.
    pub device: Device,
    /// On a GPU, the share of the memory left free by the weights that the KV pool takes
    /// (instead of `kv_memory_bytes`); the rest is for activations.
    pub gpu_memory_fraction: f64,
    /// Most requests in one running batch.
    pub max_num_seqs: usize,
    /// How a step's token budget is shared (decodes, short and long prefill chunks).
    pub step_rule: StepRule,
    /// Most requests waiting to start; beyond it `submit` answers `Overloaded`.
    pub max_waiting: usize,
    /// Share of the pool that other workers may borrow at once.
    pub lend_fraction: f64,
    /// How long a request may wait for blocks (to start, or to start again after it yielded
    /// them) before it ends with a retryable error.
    pub queue_timeout: Duration,
    /// Workers the pool is configured with, this one included: with their lend caps (taken as
    /// this worker's), they bound the longest request, whether or not all are up yet.
    pub pool_workers: usize,
    /// Benchmarks only: prompts count as already in the cache but for their last token
    /// (`Scheduler::with_unfilled_prompts`).
    pub unfilled_prompts: bool,
    /// On a GPU, no CUDA graphs: every kernel is launched on its own.
    pub enforce_eager: bool,
    /// Joins a pool of workers: lend to them and borrow from them.
    pub cluster: Option<ClusterOptions>,
    /// Where to record, per layer, how long the home waited for creditors.
    pub remote_attention: Option<prometheus_client::metrics::histogram::Histogram>,
}

/// How this worker takes part in the pooled KV cache.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub worker_id: String,
    /// Where homes that borrow from this worker connect.
    pub peer_listen: SocketAddr,
    /// The cluster token peers must present.
    pub token: Secret,
    /// How attention's rows and partials travel to and from peers.
    pub transport: Transport,
    /// Where refused peer frames are counted.
    pub rejects: Rejects,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            block_tokens: 16,
            kv_blocks: None,
            kv_memory_bytes: 2 << 30,
            max_num_seqs: 64,
            step_rule: StepRule::default(),
            max_waiting: 256,
            lend_fraction: 0.5,
            queue_timeout: Duration::from_secs(60),
            pool_workers: 1,
            unfilled_prompts: false,
            enforce_eager: false,
            cluster: None,
            remote_attention: None,
            device: Device::Cpu,
            gpu_memory_fraction: 0.9,
        }
    }
}

/// The compute device of a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    /// A CUDA GPU, by ordinal.
    Cuda(usize),
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("loading the model from {dir}: {source}")]
    Load {
        dir: PathBuf,
        #[source]
        source: crate::model::llama::ModelError,
    },
    #[error("invalid engine options: {0}")]
    Options(String),
    #[error("starting the engine thread: {0}")]
    Thread(#[from] std::io::Error),
    #[error("opening the GPU: {0}")]
    Cuda(#[from] crate::backend::cuda::CudaError),
}

/// What a step hands back for its sampling rows.
enum Picked {
    /// The token of each row, chosen by the backend under the row's draw.
    Tokens(Vec<u32>),
    /// `[rows, vocab]` logits, for the samplers.
    Logits(Vec<f32>),
}

struct Shared {
    accepting: AtomicBool,
    draining: AtomicBool,
    /// Submitted and not yet counted in the published `waiting`.
    queued: AtomicUsize,
    /// The last request id: ids are microseconds since the epoch at arrival (made unique),
    /// shifted left by `ID_TIE_BITS`, below which every id of this worker carries `id_tie`,
    /// so requests of different workers compare by age and two that arrive in the same
    /// microsecond at two workers still differ (equal ids would let each wait on the other).
    last_id: std::sync::atomic::AtomicU64,
    id_tie: u64,
    /// Tokens the local pool holds; borrowing adds what creditors can lend.
    local_capacity: usize,
    /// What the other workers the pool is configured with could lend at most, in blocks.
    configured_lend_caps: usize,
    max_positions: usize,
    block_tokens: usize,
    creditors: Arc<Mutex<Vec<Creditor>>>,
    /// What the other workers could lend at most, together (their lend caps), in blocks.
    pool_lend_caps: AtomicUsize,
    peer_addr: Option<SocketAddr>,
    max_waiting: usize,
    max_num_seqs: usize,
    /// Blocks each request holds, by (request, holder's worker id), as of the last step.
    placements: Mutex<Placements>,
    /// Moves the gManager planned for this worker's requests, not yet taken by the engine.
    moves: Mutex<Vec<PlannedMove>>,
}

/// Blocks by (request, holder's worker id), this worker included.
pub type Placements = std::collections::BTreeMap<(SeqId, String), u64>;

/// Cheap to clone; every clone talks to the same engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    shared: Arc<Shared>,
    submit: std_mpsc::Sender<Inbox>,
    stats: watch::Receiver<EngineStats>,
    liveness: Liveness,
}

/// Loads the model folder onto the chosen device and starts the engine thread.
pub fn start(model_dir: &Path, opts: EngineOptions) -> Result<EngineHandle, EngineError> {
    let load = |source| EngineError::Load {
        dir: model_dir.to_path_buf(),
        source,
    };
    match opts.device {
        Device::Cpu => start_with(Llama::load(model_dir, Cpu::new()).map_err(load)?, opts),
        Device::Cuda(ordinal) => {
            let gpu = Cuda::new(ordinal)?.with_graphs(!opts.enforce_eager);
            start_with(Llama::load(model_dir, gpu).map_err(load)?, opts)
        }
    }
}

fn start_with<B: Backend>(
    model: Llama<B>,
    opts: EngineOptions,
) -> Result<EngineHandle, EngineError> {
    if opts.block_tokens == 0 || !opts.block_tokens.is_power_of_two() {
        return Err(EngineError::Options(format!(
            "block tokens must be a power of two, got {}",
            opts.block_tokens
        )));
    }
    let rule = opts.step_rule;
    if opts.max_num_seqs == 0 || rule.max_batched_tokens == 0 {
        return Err(EngineError::Options(
            "max_num_seqs and max_batched_tokens must be positive".into(),
        ));
    }
    if !(rule.long_prefill_share > 0.0 && rule.long_prefill_share <= 1.0) {
        return Err(EngineError::Options(format!(
            "the long prefill share must be in (0, 1], got {}",
            rule.long_prefill_share
        )));
    }
    let probe = model.kv_shape(1, opts.block_tokens);
    let budget = match model.backend().free_memory() {
        Some(free) => (free as f64 * opts.gpu_memory_fraction) as usize,
        None => opts.kv_memory_bytes,
    };
    let blocks = opts
        .kv_blocks
        .unwrap_or(budget / model.backend().kv_block_bytes(probe));
    if blocks == 0 {
        return Err(EngineError::Options(
            "the KV pool would hold no rBlock".into(),
        ));
    }
    let kv = model
        .backend()
        .alloc_kv(model.kv_shape(blocks, opts.block_tokens));
    let scheduler = Scheduler::new(
        SchedulerConfig {
            block_tokens: opts.block_tokens,
            max_num_seqs: opts.max_num_seqs,
            rule,
        },
        RManager::new(blocks, opts.lend_fraction),
    )
    .with_unfilled_prompts(opts.unfilled_prompts);
    if opts.unfilled_prompts {
        tracing::warn!(
            "benchmark mode: prompts are not prefilled (their K/V is whatever the blocks hold); \
             outputs are meaningless"
        );
    }
    let (submit_tx, submit_rx) = std_mpsc::channel();
    let creditors = Arc::new(Mutex::new(Vec::new()));
    let (link, peer_addr) = match &opts.cluster {
        Some(c) => {
            let tx = Mutex::new(submit_tx.clone());
            let sink = Arc::new(move |m| {
                let _ = tx
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .send(Inbox::Peer(m));
            });
            let direct_links = match c.transport {
                Transport::Tcp => false,
                Transport::Auto => model.backend().has_links(),
                Transport::Nccl if model.backend().has_links() => true,
                Transport::Nccl => {
                    return Err(EngineError::Options(
                        "transport nccl needs a GPU (--device cuda) and libnccl.so on the library path"
                            .into(),
                    ));
                }
            };
            let guard = Guard {
                limits: FrameLimits {
                    kv: model.kv_shape(blocks, opts.block_tokens),
                    q_heads: model.config().num_attention_heads,
                    max_rows: opts.step_rule.max_batched_tokens,
                },
                rejects: c.rejects.clone(),
            };
            let (peers, bound) = TcpPeers::listen(
                c.peer_listen,
                c.worker_id.clone(),
                c.token.clone(),
                sink,
                direct_links,
                guard,
            )
            .map_err(EngineError::Thread)?;
            (
                Some(ClusterLink::new(
                    peers,
                    creditors.clone(),
                    opts.remote_attention.clone(),
                )),
                Some(bound),
            )
        }
        None => (None, None),
    };
    tracing::info!(
        backend = model.backend().name(),
        kv_blocks = blocks,
        block_tokens = opts.block_tokens,
        lend_cap = scheduler.rmanager().lend_cap(),
        peer_addr = ?peer_addr,
        "engine ready"
    );
    let shared = Arc::new(Shared {
        accepting: AtomicBool::new(true),
        draining: AtomicBool::new(false),
        queued: AtomicUsize::new(0),
        last_id: Default::default(),
        id_tie: opts.cluster.as_ref().map_or(0, |c| id_tie(&c.worker_id)),
        local_capacity: scheduler.capacity_tokens(),
        configured_lend_caps: opts.pool_workers.saturating_sub(1) * scheduler.rmanager().lend_cap(),
        max_positions: model.config().max_position_embeddings,
        block_tokens: opts.block_tokens,
        creditors,
        pool_lend_caps: AtomicUsize::new(0),
        peer_addr,
        max_waiting: opts.max_waiting,
        max_num_seqs: opts.max_num_seqs,
        placements: Mutex::default(),
        moves: Mutex::default(),
    });
    let (stats_tx, stats_rx) = watch::channel(EngineStats {
        kv_blocks_total: blocks,
        ..Default::default()
    });
    let mut runner = Runner {
        model,
        kv,
        scheduler,
        active: HashMap::new(),
        shared: shared.clone(),
        stats: stats_tx,
        link,
        stash: Vec::new(),
        reclaimed: false,
        recomputed_blocks: 0,
        migrator: Migrator::default(),
        admitted: 0,
        me: opts.cluster.as_ref().map(|c| c.worker_id.clone()),
        deferred: Vec::new(),
        queue_timeout: opts.queue_timeout,
    };
    let liveness = Liveness::default();
    let watch = liveness.watch();
    std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || {
            let _watch = watch;
            runner.run(submit_rx)
        })?;
    Ok(EngineHandle {
        shared,
        submit: submit_tx,
        stats: stats_rx,
        liveness,
    })
}

impl EngineHandle {
    /// Queues a request. The receiver yields its tokens; dropping it cancels the request.
    pub fn submit(
        &self,
        req: GenerateRequest,
    ) -> Result<mpsc::UnboundedReceiver<Event>, SubmitError> {
        let s = &self.shared;
        if !s.accepting.load(Ordering::Acquire) {
            return Err(SubmitError::ShuttingDown);
        }
        let prompt = req.prompt_tokens.len();
        if prompt == 0 {
            return Err(SubmitError::EmptyPrompt);
        }
        let max_tokens = req.sampling.max_tokens;
        let max_context = self.max_context_tokens();
        if prompt + max_tokens > max_context {
            return Err(SubmitError::ContextLengthExceeded {
                max: max_context,
                requested: prompt + max_tokens,
                prompt,
                max_tokens,
            });
        }
        let waiting = self.stats.borrow().waiting + s.queued.load(Ordering::Acquire);
        if waiting >= s.max_waiting {
            return Err(SubmitError::Overloaded {
                waiting,
                retry_after: self.retry_after(),
            });
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let id = s.next_id();
        s.queued.fetch_add(1, Ordering::AcqRel);
        if self
            .submit
            .send(Inbox::Submit(Submitted { id, req, tx }))
            .is_err()
        {
            s.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(SubmitError::ShuttingDown);
        }
        Ok(rx)
    }

    /// Why the engine thread is gone (it panicked), if it is: the worker is then unhealthy.
    pub fn failure(&self) -> Option<String> {
        self.liveness.failure()
    }

    pub fn stats(&self) -> EngineStats {
        *self.stats.borrow()
    }

    /// The longest prompt plus output a request here can hold: the local pool plus what the
    /// other workers could lend (the lend caps of the workers the pool is configured with, or
    /// of those the gManager knows, or what they last advised: the most of these), within the
    /// model's positions. A request within it that cannot get blocks now waits, bounded.
    pub fn max_context_tokens(&self) -> usize {
        let s = &self.shared;
        let advised: u64 = s
            .creditors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|c| c.lendable_blocks)
            .sum();
        let lendable = (advised as usize)
            .max(s.pool_lend_caps.load(Ordering::Acquire))
            .max(s.configured_lend_caps);
        (s.local_capacity + lendable * s.block_tokens).min(s.max_positions)
    }

    pub fn block_tokens(&self) -> usize {
        self.shared.block_tokens
    }

    /// Where peers reach this worker's transport, if it is in a pool.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.shared.peer_addr
    }

    /// Where to borrow from, best first, as the gManager advises.
    pub fn set_creditors(&self, creditors: Vec<Creditor>) {
        *self
            .shared
            .creditors
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = creditors;
    }

    /// Where this worker's requests keep their blocks, as of the last step.
    pub fn placements(&self) -> Placements {
        self.shared
            .placements
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Moves the gManager planned for this worker's requests; the engine migrates them.
    pub fn hand_moves(&self, moves: Vec<PlannedMove>) {
        self.shared
            .moves
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(moves);
    }

    /// What the other workers could lend at most, together, as the gManager last reported.
    pub fn set_pool_lend_caps(&self, blocks: usize) {
        self.shared.pool_lend_caps.store(blocks, Ordering::Release);
    }

    pub fn is_accepting(&self) -> bool {
        self.shared.accepting.load(Ordering::Acquire)
    }

    /// Starts a graceful leave: no new requests, nothing more lent, and every home that holds
    /// blocks here is told to take them back. Running and queued requests go on to the end.
    pub fn begin_drain(&self) {
        self.shared.accepting.store(false, Ordering::Release);
        if !self.shared.draining.swap(true, Ordering::AcqRel) {
            let _ = self.submit.send(Inbox::Drain);
        }
    }

    /// Resolves when nothing depends on this worker any more: no request of its own is
    /// running or waiting, and no block is lent.
    pub async fn wait_drained(&self) {
        let mut rx = self.stats.clone();
        let shared = self.shared.clone();
        // The engine thread publishes stats after every step and whenever it goes idle.
        let _ = rx
            .wait_for(|s| {
                s.running == 0
                    && s.waiting == 0
                    && s.kv_blocks_lent == 0
                    && shared.queued.load(Ordering::Acquire) == 0
            })
            .await;
    }

    /// How long an overloaded client should wait before retrying: about the time for the
    /// queue ahead of it to start.
    pub fn retry_after(&self) -> Duration {
        let waiting = self.stats.borrow().waiting;
        Duration::from_secs(1 + (waiting / self.shared.max_num_seqs.max(1)) as u64)
    }
}

/// Low bits of a request id that tell workers apart (micros since the epoch fit in 52 bits).
const ID_TIE_BITS: u32 = 11;

/// This worker's low id bits: a hash of its id (FNV-1a), the same in every process.
fn id_tie(worker_id: &str) -> u64 {
    let hash = worker_id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    hash & ((1 << ID_TIE_BITS) - 1)
}

impl Shared {
    /// A new request id: microseconds since the epoch with this worker's tie bits, above the
    /// last one.
    fn next_id(&self) -> SeqId {
        let micros = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let now = (micros << ID_TIE_BITS) | self.id_tie;
        let step = 1 << ID_TIE_BITS;
        let last = self
            .last_id
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |last| {
                Some(now.max(last + step))
            })
            .expect("the update always succeeds");
        now.max(last + step)
    }
}

/// Makes room here for the request a `Reserve` asks for: this worker's running requests
/// newer than it yield their blocks, and if the lend cap still leaves it short, the loans held
/// for newer requests of other homes are to be called back. Whether any request here yielded,
/// and the loans to call back.
fn yield_for(scheduler: &mut Scheduler, m: &Incoming) -> (bool, Vec<LoanKey>) {
    let Incoming::Request {
        msg: PeerMsg::Reserve { seq, blocks, .. },
        ..
    } = m
    else {
        return (false, Vec::new());
    };
    let asked = *blocks as usize;
    let yielded = scheduler.yield_to(*seq, asked);
    if !yielded.is_empty() {
        tracing::debug!(
            ?yielded,
            "newer requests yield blocks to an older one of another home"
        );
    }
    let rm = scheduler.rmanager_mut();
    let can = rm.lend_cap().saturating_sub(rm.lent()).min(rm.free());
    let recalls = rm.recall_newer(*seq, asked.saturating_sub(can));
    if !recalls.is_empty() {
        tracing::debug!(
            asker = seq,
            ?recalls,
            "calling back loans of newer requests"
        );
    }
    (!yielded.is_empty(), recalls)
}

struct Active {
    req: GenerateRequest,
    sampler: Sampler,
    tx: mpsc::UnboundedSender<Event>,
    generated: usize,
    /// When it last made progress (arrived, or was in a step): a request waiting for blocks,
    /// to start or to grow, longer than the queue time limit since then ends with a
    /// retryable error.
    progress_at: Instant,
}

struct Runner<B: Backend> {
    model: Llama<B>,
    kv: B::Kv,
    scheduler: Scheduler,
    active: HashMap<SeqId, Active>,
    shared: Arc<Shared>,
    stats: watch::Sender<EngineStats>,
    link: Option<ClusterLink>,
    /// Requests that arrived while the engine waited on peers.
    stash: Vec<Submitted>,
    /// Whether the homes borrowing here were told to take their blocks back (draining).
    reclaimed: bool,
    recomputed_blocks: u64,
    migrator: Migrator,
    /// Requests taken in since the last `publish`, still counted in `Shared::queued`.
    admitted: usize,
    /// This worker's id in the pool, naming its own blocks in the placements.
    me: Option<String>,
    /// Block copies other homes asked for during the last step, served after it.
    deferred: Vec<KvWork>,
    queue_timeout: Duration,
}

impl<B: Backend> Runner<B> {
    fn run(&mut self, rx: std_mpsc::Receiver<Inbox>) {
        loop {
            for s in std::mem::take(&mut self.stash) {
                self.admit(s);
            }
            self.reclaim_if_draining();
            self.recover();
            self.expire_stalled();
            self.link_devices();
            if self.scheduler.is_idle() {
                self.publish();
                // A link coming up needs looking at even when nothing arrives.
                let linking = self.link.as_ref().is_some_and(|l| l.links_pending());
                match if linking {
                    rx.recv_timeout(LINK_POLL)
                } else {
                    rx.recv()
                        .map_err(|_| std_mpsc::RecvTimeoutError::Disconnected)
                } {
                    Ok(m) => self.handle(m),
                    Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
                }
                continue;
            }
            while let Ok(m) = rx.try_recv() {
                self.handle(m);
            }
            self.drop_cancelled();
            self.migrate(&rx);
            self.borrow(&rx);
            let worked = self.step(&rx);
            self.send_releases();
            self.publish();
            if !worked {
                // Requests wait for blocks that only another request or worker can free: sleep
                // on the inbox instead of spinning.
                if let Ok(m) = rx.recv_timeout(IDLE_WAIT) {
                    self.handle(m);
                }
            }
        }
    }

    fn handle(&mut self, m: Inbox) {
        let m = match self.link.as_mut() {
            Some(link) => link.intercept(m),
            None => Some(m),
        };
        match m {
            Some(Inbox::Submit(s)) => self.admit(s),
            Some(Inbox::Peer(m)) => {
                self.yield_to_older(&m);
                serve_home(&self.model, &mut self.kv, &mut self.scheduler, m);
            }
            // Looked at at the top of the loop.
            Some(Inbox::Drain) | None => {}
        }
    }

    /// Offers a direct device link to each new creditor connection, and joins those homes
    /// offered; attention uses a link once both ends have it up.
    fn link_devices(&mut self) {
        let Some(link) = self.link.as_mut() else {
            return;
        };
        let backend = self.model.backend();
        link.offer_links(|| backend.link_offer());
        for (id, reply) in std::mem::take(&mut link.offers) {
            let answer = match backend.link_accept(&id) {
                Ok(l) => {
                    tracing::info!("joined a home's direct link (NCCL)");
                    reply.set_link(l);
                    PeerMsg::LinkAnswer {
                        accepted: true,
                        reason: String::new(),
                    }
                }
                Err(e) => PeerMsg::LinkAnswer {
                    accepted: false,
                    reason: e.to_string(),
                },
            };
            reply.send(&answer);
        }
    }

    /// Once draining: lend nothing more and ask every home holding blocks here to take them
    /// back (each migrates those blocks elsewhere and releases them).
    fn reclaim_if_draining(&mut self) {
        if self.reclaimed || !self.shared.draining.load(Ordering::Acquire) {
            return;
        }
        self.reclaimed = true;
        let rm = self.scheduler.rmanager_mut();
        rm.stop_lending();
        let homes = rm.borrowers();
        tracing::info!(
            homes = homes.len(),
            lent = rm.lent(),
            "draining: lending stopped; homes asked to take their blocks back"
        );
        if let Some(link) = &self.link {
            for home in homes {
                link.peers.tell_home(&home, &PeerMsg::Reclaim);
            }
        }
    }

    /// Requests whose loans a creditor called back, and those with blocks on creditors that
    /// were lost, go back to the queue and are recomputed from their token ids (elsewhere, as
    /// borrowing allows).
    fn recover(&mut self) {
        let Some(link) = self.link.as_mut() else {
            return;
        };
        let recalled = link.take_recalled();
        if !recalled.is_empty() {
            let running: Vec<SeqId> = recalled
                .into_iter()
                .filter(|&id| self.scheduler.recall(id))
                .collect();
            tracing::debug!(
                ?running,
                "loans called back for older requests; these yield and are recomputed"
            );
            self.send_releases();
        }
        let Some(link) = self.link.as_mut() else {
            return;
        };
        let peers = link.take_troubled();
        if peers.is_empty() {
            return;
        }
        let (requests, blocks) = self.scheduler.evict_holding(&peers);
        if !requests.is_empty() {
            self.recomputed_blocks += blocks as u64;
            tracing::warn!(
                ?requests,
                blocks,
                "blocks on a lost or draining creditor given up; recomputing them"
            );
        }
        self.send_releases();
    }

    /// Moves a few blocks before the step: those of creditors that asked for them back (to
    /// local free blocks or other creditors; recomputed only when nowhere had room in time),
    /// and those the gManager planned (local blocks to a creditor, before the home overflows).
    fn migrate(&mut self, rx: &std_mpsc::Receiver<Inbox>) {
        let Some(link) = self.link.as_mut() else {
            return;
        };
        let planned =
            std::mem::take(&mut *self.shared.moves.lock().unwrap_or_else(|e| e.into_inner()));
        for m in planned {
            self.migrator.offload(m.request, m.to, m.blocks as usize);
        }
        // Every step of a request waits for its creditors' steps: blocks on a creditor that
        // now serves requests of its own come home as local blocks free up.
        if self.scheduler.repatriation_room() > 0 {
            for peer in self.scheduler.lenders() {
                if link.is_busy(peer) {
                    self.migrator
                        .repatriate(peer, self.scheduler.running_on(peer));
                }
            }
        }
        for peer in link.take_reclaiming() {
            let seqs = self.scheduler.running_on(peer);
            tracing::info!(creditor = %link.peers.worker(peer), requests = ?seqs, "moving the blocks a draining creditor holds");
            self.migrator.evacuate(peer, seqs);
            self.scheduler.drop_reservations_on(&[peer]);
        }
        let recompute = self.migrator.run(&mut Ctx {
            model: &self.model,
            kv: &mut self.kv,
            scheduler: &mut self.scheduler,
            link,
            inbox: rx,
            stash: &mut self.stash,
        });
        for seq in recompute {
            let blocks = self.scheduler.evict(seq);
            self.recomputed_blocks += blocks as u64;
            tracing::warn!(
                seq,
                blocks,
                "no room to move blocks off a draining creditor; recomputing them"
            );
        }
        self.send_releases();
    }

    /// Borrows on creditors, before the step, the blocks the local pool cannot give it: for
    /// each request short of blocks, in the order the step serves them, a batch at a time (on
    /// busy creditors only for the requests the policy lets borrow there).
    /// What a round gets is kept; a round that falls short ends this step's borrowing (the
    /// scheduler then preempts) and the next waits a little, or for new advice.
    fn borrow(&mut self, rx: &std_mpsc::Receiver<Inbox>) {
        let Self {
            model,
            kv,
            scheduler,
            link,
            stash,
            ..
        } = self;
        let Some(link) = link.as_mut() else {
            return;
        };
        let wants = scheduler.shortfalls();
        if wants.is_empty() || !link.may_borrow() {
            return;
        }
        for (seq, want, busy_too) in wants {
            if !busy_too && !link.any_idle_creditor() {
                // It grows at home instead: the newest request there yields to it.
                continue;
            }
            let mut recalls = Vec::new();
            let round = link.borrow(seq, want, busy_too, rx, &mut |m| match m {
                Inbox::Submit(s) => stash.push(s),
                Inbox::Peer(m) => {
                    // Two homes that borrow at once still let the older request progress;
                    // the releases and recalls go out after the round.
                    recalls.extend(yield_for(scheduler, &m).1);
                    serve_home(model, kv, scheduler, m);
                }
                Inbox::Drain => {}
            });
            link.recall(&recalls);
            let got: usize = round.grants.iter().map(|(_, b)| b.len()).sum();
            for (peer, blocks) in round.grants {
                scheduler.add_borrowed(seq, peer, &blocks);
            }
            if !round.complete {
                tracing::debug!(seq, want, got, "the pool lent less than asked");
                // Wound-wait for this home's own request too: what it lent to newer requests
                // of other homes comes back, or two homes that each lent to the other's newer
                // request would wait on each other for ever.
                let own = scheduler
                    .rmanager_mut()
                    .recall_newer(seq, want.saturating_sub(got));
                if !own.is_empty() {
                    tracing::debug!(seq, recalls = ?own, "calling back loans to newer requests");
                    link.recall(&own);
                }
                break;
            }
        }
    }

    /// The pool-wide half of "the oldest progresses": asked to lend for another home's request
    /// while full, this worker's running requests that arrived after it yield their blocks.
    fn yield_to_older(&mut self, m: &Incoming) {
        let (yielded, recalls) = yield_for(&mut self.scheduler, m);
        if yielded {
            self.send_releases();
        }
        if let Some(link) = &self.link {
            link.recall(&recalls);
        }
    }

    /// Ends requests that waited for blocks longer than the queue time limit since they last
    /// made progress, with a retryable error: the pool cannot hold them now.
    fn expire_stalled(&mut self) {
        let limit = self.queue_timeout;
        let expired: Vec<SeqId> = self
            .scheduler
            .waiting_ids()
            .chain(self.scheduler.running_ids())
            .filter(|id| {
                self.active
                    .get(id)
                    .is_some_and(|a| a.progress_at.elapsed() > limit)
            })
            .collect();
        for id in expired {
            tracing::warn!(
                request = id,
                limit_secs = limit.as_secs_f64(),
                "no KV blocks for the request in time; it ends retryable"
            );
            if let Some(a) = self.active.get(&id) {
                let _ = a.tx.send(Event::Failed {
                    message: format!(
                        "the KV cache pool had no room for this request within {} s; retry later",
                        limit.as_secs()
                    ),
                    retryable: true,
                });
            }
            self.finish(id);
        }
        self.send_releases();
    }

    fn send_releases(&mut self) {
        let released = self.scheduler.take_released();
        if let Some(link) = &mut self.link {
            for (seq, peer) in released {
                link.release(seq, peer);
            }
        }
    }

    fn admit(&mut self, s: Submitted) {
        self.admitted += 1;
        self.scheduler
            .add(s.id, s.req.prompt_tokens.clone(), s.req.sampling.max_tokens);
        self.active.insert(
            s.id,
            Active {
                sampler: Sampler::new(s.req.sampling.clone()),
                req: s.req,
                tx: s.tx,
                generated: 0,
                progress_at: Instant::now(),
            },
        );
    }

    fn drop_cancelled(&mut self) {
        let gone: Vec<SeqId> = self
            .active
            .iter()
            .filter(|(_, a)| a.tx.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            tracing::debug!(request = id, "client went away; freeing its blocks");
            self.finish(id);
        }
    }

    fn finish(&mut self, id: SeqId) {
        self.scheduler.remove(id);
        self.active.remove(&id);
    }

    /// Runs one step; false if nothing could run.
    fn step(&mut self, rx: &std_mpsc::Receiver<Inbox>) -> bool {
        let step = self.scheduler.schedule();
        if !step.preempted.is_empty() {
            tracing::debug!(preempted = ?step.preempted, "KV pool full; recomputing later");
        }
        if step.items.is_empty() {
            return false;
        }
        let now = Instant::now();
        for it in &step.items {
            if let Some(a) = self.active.get_mut(&it.seq) {
                a.progress_at = now;
            }
        }
        // When no sampling row needs more than its token, only token ids leave the device.
        let token_only = step.items.iter().filter(|it| it.samples).all(|it| {
            self.active
                .get(&it.seq)
                .is_some_and(|a| a.sampler.wants_token_only())
        });
        let draws: Vec<RowDraw> = if token_only {
            step.items
                .iter()
                .filter(|it| it.samples)
                .map(|it| {
                    self.active
                        .get_mut(&it.seq)
                        .expect("scheduled requests are active")
                        .sampler
                        .next_draw()
                })
                .collect()
        } else {
            Vec::new()
        };
        let mut local = NoExchange;
        let mut pooled;
        // A worker that lends answers its borrowers' attention calls between the layers of its
        // own steps, not after them: each layer of a borrower's step waits on that answer. A
        // device with direct links queues its step whole and answers linked calls after it.
        let lends = self.scheduler.rmanager().lent() > 0 && !self.model.backend().has_links();
        let exchange: &mut dyn Exchange = match self.link.as_mut() {
            Some(link) if !step.remote.is_empty() || lends => {
                pooled = LayerExchange::new(
                    link,
                    rx,
                    self.scheduler.rmanager_mut(),
                    &mut self.stash,
                    &mut self.deferred,
                );
                &mut pooled
            }
            _ => &mut local,
        };
        let input = step.input();
        let picked = if token_only {
            self.model
                .forward_sampled(&mut self.kv, &input, &draws, exchange)
                .map(Picked::Tokens)
        } else {
            self.model
                .forward(&mut self.kv, &input, exchange)
                .map(Picked::Logits)
        };
        let bt = self.scheduler.block_tokens();
        for work in std::mem::take(&mut self.deferred) {
            serve_kv(&self.model, &mut self.kv, bt, work);
        }
        let picked = match picked {
            Ok(p) => p,
            Err(e) => {
                // Only a creditor fails a step, and it is noted lost: the step's K/V is partly
                // written, so its requests run it again, those with blocks there from scratch.
                tracing::warn!(error = %e, "step failed; running it again");
                self.scheduler.rollback(&step.items);
                self.recover();
                return true;
            }
        };
        let vocab = self.model.config().vocab_size;
        let sampling = step.items.iter().filter(|it| it.samples);
        for (row, item) in sampling.enumerate() {
            let a = self
                .active
                .get_mut(&item.seq)
                .expect("scheduled requests are active");
            let (token, logprob) = match &picked {
                Picked::Tokens(t) => {
                    a.sampler.taken();
                    (t[row], None)
                }
                Picked::Logits(l) => a.sampler.sample(&l[row * vocab..(row + 1) * vocab]),
            };
            a.generated += 1;
            let sent = a.tx.send(Event::Token { id: token, logprob });
            let eos = a.req.ends_on(token);
            let done = if eos {
                Some(FinishReason::Stop)
            } else if a.generated >= a.req.sampling.max_tokens {
                Some(FinishReason::Length)
            } else {
                None
            };
            match (sent, done) {
                (Err(_), _) => self.finish(item.seq),
                (Ok(()), Some(reason)) => {
                    let _ = a.tx.send(Event::Finished {
                        reason,
                        prompt_tokens: a.req.prompt_tokens.len(),
                        completion_tokens: a.generated,
                    });
                    self.finish(item.seq);
                }
                (Ok(()), None) => self.scheduler.append_token(item.seq, token),
            }
        }
        true
    }

    fn publish(&mut self) {
        let s = &self.scheduler;
        if let (Some(link), Some(me)) = (&self.link, &self.me) {
            let placements = s
                .placements()
                .into_iter()
                .map(|(seq, holder, n)| {
                    let worker = match holder {
                        Holder::Local => me.clone(),
                        Holder::Peer(p) => link.peers.worker(p).to_owned(),
                    };
                    ((seq, worker), n as u64)
                })
                .collect();
            *self
                .shared
                .placements
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = placements;
        }
        self.stats.send_replace(EngineStats {
            running: s.running(),
            waiting: s.waiting(),
            kv_blocks_total: s.blocks_total(),
            kv_blocks_used: s.blocks_used(),
            kv_blocks_lent: s.rmanager().lent(),
            kv_blocks_borrowed: s.borrowed_blocks(),
            kv_blocks_lend_cap: s.rmanager().lend_cap(),
            kv_borrow_total: self.link.as_ref().map_or(0, |l| l.borrow_total),
            kv_borrow_refusals_total: self.link.as_ref().map_or(0, |l| l.refusals_total),
            preemptions_total: s.preemptions(),
            kv_recomputed_blocks_total: self.recomputed_blocks,
            kv_migrated_blocks_total: self.migrator.migrated_total,
            migrations_in_flight: self.migrator.in_flight(),
            peer_losses_total: self.link.as_ref().map_or(0, |l| l.losses_total),
            peer_direct_links: self.link.as_ref().map_or(0, |l| l.direct_links_up()),
            draining: self.shared.draining.load(Ordering::Acquire),
        });
        // Only now that `waiting` counts them: in between, `submit` would see a request in
        // neither count and let one too many in.
        self.shared
            .queued
            .fetch_sub(std::mem::take(&mut self.admitted), Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_of_two_workers_differ_within_a_microsecond_and_still_order_by_age() {
        let (a, b) = (id_tie("worker-0"), id_tie("worker-1"));
        assert_ne!(a, b, "same microsecond at two workers");
        let micros = 1_796_615_704_476_421_u64;
        let id = |m: u64, tie: u64| (m << ID_TIE_BITS) | tie;
        assert!(id(micros, a.max(b)) < id(micros + 1, a.min(b)));
        assert_eq!(id_tie("worker-0"), a, "the same in every process");
    }
}
