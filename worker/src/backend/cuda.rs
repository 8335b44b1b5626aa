//! The CUDA backend: cuBLAS for the projections (bf16 operands, f32 accumulation and output) and
//! the kernels of `kernels/llama.cu` for the rest, all on one stream.
//!
//! Weights and the KV cache are bf16, activations f32. The KV cache keeps the CPU backend's
//! layout, `[layer][block][kv_head][token][dim]` for K and for V. Small per-step tables (token
//! ids, positions, KV slots, attention metadata) are uploaded only when they change, so the
//! layers of one step share one upload and a decode step allocates nothing once warm.
//!
//! A decode step's work between one layer's attention and the next is replayed from CUDA graphs
//! (`replays`): one launch instead of about a dozen kernels a layer.

use std::cell::{Cell, RefCell};
use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublas::{CudaBlas, sys as blas};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaGraph, CudaSlice, CudaStream, DevicePtr, DevicePtrMut,
    DeviceRepr, DriverError, LaunchArgs, LaunchConfig, PushKernelArg,
};
use rayon::prelude::*;

use super::kernel_build::{self, BuildError};
mod link;
mod replays;

use super::{AttnSeq, AttnShape, Backend, DeviceLink, KvShape, LinkError, NO_SLOT, ReplayKey};
use crate::sampling::RowDraw;
use replays::{Decision, Replays};

#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("no CUDA driver library (libcuda.so) on this machine")]
    NoDriver,
    #[error("CUDA device {ordinal}: {source}")]
    Device {
        ordinal: usize,
        #[source]
        source: DriverError,
    },
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("loading kernel {name}: {source}")]
    Kernel {
        name: String,
        #[source]
        source: DriverError,
    },
    #[error("creating the cuBLAS handle: {0:?}")]
    Blas(cudarc::cublas::result::CublasError),
    #[error("CUDA device {ordinal}: {what}: {source}")]
    Setup {
        ordinal: usize,
        what: &'static str,
        #[source]
        source: DriverError,
    },
}

/// Whether this machine can run the CUDA backend at all: a driver library and a GPU.
pub fn available() -> bool {
    // SAFETY: only probes whether the driver library can be opened.
    let present = unsafe { cudarc::driver::sys::is_culib_present() };
    present && CudaContext::device_count().is_ok_and(|n| n > 0)
}

/// Threads of a norm's block (one block a row): a decode row is normalized by one block, so it
/// is as wide as a block goes (kernels/llama.cu's vector path covers rows up to 16 x this).
const NORM_THREADS: u32 = 1024;
/// Fewest KV segments one split of the decode kernel reads: finer splits only add merge work.
const MIN_SEGS_PER_SPLIT: usize = 4;
/// cuBLAS's workspace (what NVIDIA suggests for Hopper).
const BLAS_WORKSPACE: usize = 32 << 20;
/// Threads of the attention kernel's blocks (kernels/llama.cu: WARPS * 32).
const ATTN_THREADS: u32 = 128;
/// Rows of the prefill kernel's product per block (kernels/llama.cu: PF_M): query rows times
/// the query heads of one KV head.
const PREFILL_M: usize = 64;
/// KV token slots of the prefill kernel's tiles (PF_N): a block holds whole segments of them.
const PREFILL_N: usize = 64;
/// A sequence with at least this many query rows goes to the prefill kernel; fewer rows would
/// leave most of a tile's tensor-core work empty.
const PREFILL_MIN_ROWS: usize = 8;
/// Head dimensions the prefill kernel is built for.
const PREFILL_HEAD_DIMS: [usize; 2] = [64, 128];

/// Dynamic shared memory of the prefill kernel: two stages of K and V tiles of PREFILL_N rows,
/// each padded by 8 bf16 (kernels/llama.cu: PF_STAGE).
const fn prefill_shared_bytes(head_dim: usize) -> usize {
    2 * 2 * PREFILL_N * (head_dim + 8) * std::mem::size_of::<u16>()
}

struct Kernels {
    embed_rows: CudaFunction,
    f32_to_bf16: CudaFunction,
    add_bias: CudaFunction,
    add_assign: CudaFunction,
    rms_norm: CudaFunction,
    add_rms_norm: CudaFunction,
    rope: CudaFunction,
    silu_mul: CudaFunction,
    gather_rows: CudaFunction,
    sample_rows: CudaFunction,
    kv_write: CudaFunction,
    attn_merge: CudaFunction,
    attn_merge_rows: CudaFunction,
    /// `attn_split_h{head_dim}_g{query heads per kv head}`, indexed by log2(head_dim / 32) and
    /// log2(group), with how many of its blocks a multiprocessor holds at once.
    attn_split: Vec<(CudaFunction, usize)>,
    /// `attn_prefill_h{head_dim}_g{group}`, indexed by the head_dim's place in
    /// PREFILL_HEAD_DIMS and log2(group).
    attn_prefill: Vec<CudaFunction>,
}

/// A device copy of a small host table, re-uploaded only when the table changes.
struct Table<T> {
    host: Vec<T>,
    dev: Option<CudaSlice<T>>,
}

impl<T: DeviceRepr + Copy + PartialEq> Table<T> {
    const fn new() -> Self {
        Self {
            host: Vec::new(),
            dev: None,
        }
    }

    fn put(&mut self, stream: &Arc<CudaStream>, data: &[T]) -> &CudaSlice<T> {
        let fits = self.dev.as_ref().is_some_and(|d| d.len() >= data.len());
        if !fits || self.host != data {
            if !fits {
                let len = data.len().next_power_of_two().max(64);
                // SAFETY: the first data.len() values are written below before any kernel reads.
                self.dev = Some(ok(unsafe { stream.alloc::<T>(len) }, "table allocation"));
            }
            let dev = self.dev.as_mut().expect("allocated above");
            if !data.is_empty() {
                ok(
                    stream.memcpy_htod(data, &mut dev.slice_mut(..data.len())),
                    "table upload",
                );
            }
            self.host.clear();
            self.host.extend_from_slice(data);
        }
        self.dev.as_ref().expect("allocated above")
    }
}

/// The step's staged copy of `data` when it holds it (what a recorded part reads), else `data`
/// put in the general `table`.
fn staged_or_put<'a, T: DeviceRepr + Copy + PartialEq>(
    staged: &'a Table<T>,
    table: &'a mut Table<T>,
    stream: &Arc<CudaStream>,
    data: &[T],
) -> &'a CudaSlice<T> {
    match &staged.dev {
        Some(dev) if staged.host == data => dev,
        _ => table.put(stream, data),
    }
}

/// Device scratch that grows to the largest step and is then reused.
struct Scratch {
    ids: Table<u32>,
    positions: Table<u32>,
    inv_freq: Table<f32>,
    slots: Table<u32>,
    /// The step's positions and KV slots, staged before its recorded parts replay. Kept apart
    /// from `positions` and `slots`, which serving other homes between parts rewrites.
    step_positions: Table<u32>,
    step_slots: Table<u32>,
    rows: Table<u32>,
    draws: Table<RowDraw>,
    attn: AttnTables,
    x_bf16: Option<CudaSlice<u16>>,
    picks: Option<CudaSlice<u32>>,
    part_o: Option<CudaSlice<f32>>,
    part_lse: Option<CudaSlice<f32>>,
}

impl Scratch {
    const fn new() -> Self {
        Self {
            ids: Table::new(),
            positions: Table::new(),
            inv_freq: Table::new(),
            slots: Table::new(),
            step_positions: Table::new(),
            step_slots: Table::new(),
            rows: Table::new(),
            draws: Table::new(),
            attn: AttnTables::new(),
            x_bf16: None,
            picks: None,
            part_o: None,
            part_lse: None,
        }
    }
}

/// The attention metadata of one set of sequences, on the device. Every layer of a step attends
/// over the same sequences, so the tables are built and uploaded once a step, not once a layer.
///
/// Sequences with many query rows (prompt chunks) go to the tensor-core prefill kernel, in tiles
/// of query rows; the other rows each get a slot of the split (flash-decoding) kernel.
/// `slot_rows` holds (row, sequence) per slot (rows outside every sequence point at an empty
/// one, so they come out as 0 and -inf); `meta` holds (first_row, first_row_pos, first_segment,
/// segments) per sequence; `segs` holds (block, first_pos, tokens) per segment; `tiles` holds
/// (sequence, first row in it, rows) per prefill tile.
struct AttnTables {
    /// What the tables were built from, and the grid they were split for.
    seqs: Vec<AttnSeq>,
    plan: AttnPlan,
    slots: usize,
    tiles: usize,
    splits: usize,
    segs_per_split: usize,
    slot_rows: Table<u32>,
    meta: Table<u32>,
    segs: Table<u32>,
    tile_table: Table<u32>,
}

/// What decides how the rows of an attention call are split between the two kernels.
#[derive(Clone, Copy, PartialEq, Eq)]
struct AttnPlan {
    kv_heads: usize,
    /// Query rows per prefill tile; 0 when the prefill kernel does not apply to the shape.
    tile_rows: usize,
}

impl AttnTables {
    const fn new() -> Self {
        Self {
            seqs: Vec::new(),
            plan: AttnPlan {
                kv_heads: 0,
                tile_rows: 0,
            },
            slots: 0,
            tiles: 0,
            splits: 1,
            segs_per_split: 1,
            slot_rows: Table::new(),
            meta: Table::new(),
            segs: Table::new(),
            tile_table: Table::new(),
        }
    }

    /// Rebuilds the tables when the sequences or the plan differ from the last ones; `wave` is
    /// how many blocks of the split kernel the GPU runs at once.
    fn update(&mut self, stream: &Arc<CudaStream>, seqs: &[AttnSeq], plan: AttnPlan, wave: usize) {
        if self.seqs == seqs && self.plan == plan {
            return;
        }
        let rows = seqs.iter().map(|s| s.rows.end).max().unwrap_or(0);
        let empty = seqs.len() as u32;
        let mut row_seq = vec![empty; rows];
        let mut meta = Vec::with_capacity(4 * (seqs.len() + 1));
        let mut segs = Vec::new();
        let mut tiles = Vec::new();
        let mut most_segs = 1;
        for (i, s) in seqs.iter().enumerate() {
            meta.extend([
                s.rows.start as u32,
                s.first_row_pos,
                (segs.len() / 3) as u32,
                s.segments.len() as u32,
            ]);
            for g in &s.segments {
                segs.extend([g.block, g.first_pos, g.tokens]);
            }
            if plan.tile_rows > 0 && s.rows.len() >= PREFILL_MIN_ROWS {
                for first in s.rows.clone().step_by(plan.tile_rows) {
                    let n = plan.tile_rows.min(s.rows.end - first);
                    tiles.extend([i as u32, (first - s.rows.start) as u32, n as u32]);
                }
                row_seq[s.rows.clone()].fill(u32::MAX);
            } else {
                row_seq[s.rows.clone()].fill(i as u32);
                most_segs = most_segs.max(s.segments.len());
            }
        }
        meta.extend([0, 0, 0, 0]);
        let slot_rows: Vec<u32> = row_seq
            .iter()
            .enumerate()
            .filter(|&(_, &s)| s != u32::MAX)
            .flat_map(|(row, &s)| [row as u32, s])
            .collect();
        self.slots = slot_rows.len() / 2;
        self.tiles = tiles.len() / 3;
        let blocks = (self.slots * plan.kv_heads).max(1);
        let want_splits = splits_for(blocks, wave, most_segs.div_ceil(MIN_SEGS_PER_SPLIT));
        self.segs_per_split = most_segs.div_ceil(want_splits);
        self.splits = most_segs.div_ceil(self.segs_per_split);
        self.slot_rows.put(stream, &slot_rows);
        self.meta.put(stream, &meta);
        self.segs.put(stream, &segs);
        self.tile_table.put(stream, &tiles);
        self.seqs = seqs.to_vec();
        self.plan = plan;
    }

    /// The uploaded tables: slot rows, sequences, segments, prefill tiles.
    fn device(&self) -> [&CudaSlice<u32>; 4] {
        fn dev(t: &Table<u32>) -> &CudaSlice<u32> {
            t.dev.as_ref().expect("uploaded by update")
        }
        [
            dev(&self.slot_rows),
            dev(&self.meta),
            dev(&self.segs),
            dev(&self.tile_table),
        ]
    }
}

/// How many parts to split each row's KV into, for `blocks` (rows x KV heads) of which the GPU
/// runs `wave` at once: the fewest that keep the last wave at least 95% full, so that a long
/// context alone fills the GPU and a grid of many rows has no near-empty tail; never more
/// than the longest row has segments.
fn splits_for(blocks: usize, wave: usize, most_segs: usize) -> usize {
    let fill = |splits: usize| {
        let total = blocks * splits;
        total as f64 / (total.div_ceil(wave) * wave) as f64
    };
    let most = most_segs.clamp(1, 4 * wave);
    (1..=most).find(|&s| fill(s) >= 0.95).unwrap_or_else(|| {
        (1..=most)
            .max_by(|&a, &b| fill(a).total_cmp(&fill(b)).then(b.cmp(&a)))
            .unwrap_or(1)
    })
}

fn grown<'a, T: DeviceRepr>(
    stream: &Arc<CudaStream>,
    slot: &'a mut Option<CudaSlice<T>>,
    len: usize,
) -> &'a mut CudaSlice<T> {
    if slot.as_ref().is_none_or(|s| s.len() < len) {
        // SAFETY: scratch is always written by a kernel before it is read.
        *slot = Some(ok(
            unsafe { stream.alloc::<T>(len.next_power_of_two()) },
            "scratch allocation",
        ));
    }
    slot.as_mut().expect("allocated above")
}

/// A recorded part of a step.
struct Graph(CudaGraph);

// SAFETY: a graph is only touched through its `Cuda`, which one thread uses at a time (the
// backend is Send, not Sync), the external serialization CUDA asks of graph objects.
unsafe impl Send for Graph {}

/// Device address of an optional buffer (0 when none), for the replay fingerprint.
fn addr<T>(stream: &CudaStream, buf: Option<&CudaSlice<T>>) -> u64 {
    buf.map_or(0, |b| b.device_ptr(stream).0)
}

/// Flattens KV slots for the kv_write kernel: (block, token) pairs, NO_SLOT as block u32::MAX.
fn flat_slots(slots: &[(u32, u32)]) -> Vec<u32> {
    slots
        .iter()
        .flat_map(|&(b, t)| {
            if (b, t) == NO_SLOT {
                [u32::MAX, 0]
            } else {
                [b, t]
            }
        })
        .collect()
}

/// A device fault leaves the context unusable; the engine cannot go on after one.
fn ok<T, E: std::fmt::Debug>(r: Result<T, E>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("CUDA {what} failed: {e:?}"))
}

pub struct Cuda {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    /// cuBLAS's workspace, fixed so that recorded GEMMs replay on it.
    _blas_workspace: CudaSlice<u8>,
    /// Widest input of any weight: the bf16 copy of a step's activations never outgrows
    /// rows times this, so it is sized before a part is recorded.
    widest_input: Cell<usize>,
    replays: RefCell<Replays<Graph>>,
    graph_launches: Cell<u64>,
    k: Kernels,
    sms: usize,
    scratch: RefCell<Scratch>,
    links: RefCell<link::Links>,
}

pub struct CudaWeight {
    rows: usize,
    cols: usize,
    /// bf16 bits, row-major `[rows, cols]`.
    data: CudaSlice<u16>,
}

pub struct CudaKv {
    shape: KvShape,
    k: CudaSlice<u16>,
    v: CudaSlice<u16>,
}

/// `KvGeom` of kernels/llama.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct KvGeom {
    blocks: i32,
    block_tokens: i32,
    kv_heads: i32,
    head_dim: i32,
}

// SAFETY: a plain C struct of four ints, the same layout as the kernel's.
unsafe impl DeviceRepr for KvGeom {}
// SAFETY: repr(C), four 4-byte fields, the layout of the kernel's RowDraw.
unsafe impl DeviceRepr for RowDraw {}

/// A stream and the scratch its kernels use: the compute stream's, or a link's (a creditor
/// serves its homes on their links' streams, beside its own work).
struct Lane<'a> {
    stream: &'a Arc<CudaStream>,
    scratch: &'a mut Scratch,
}

/// The scalars every attention kernel of kernels/llama.cu takes around the query and cache
/// pointers: `(q, q_width, q_col, k, v, geo, layer, scale, ...)`.
struct AttnCommon {
    q_width: i32,
    q_col: i32,
    geo: KvGeom,
    layer: i32,
    scale: f32,
}

impl Cuda {
    /// Opens GPU `ordinal` and compiles (or loads from the cache) the kernels for it.
    pub fn new(ordinal: usize) -> Result<Self, CudaError> {
        if !available() {
            return Err(CudaError::NoDriver);
        }
        let device = |source| CudaError::Device { ordinal, source };
        let ctx = CudaContext::new(ordinal).map_err(device)?;
        // One stream orders everything, so cudarc's cross-stream events are pure overhead.
        // SAFETY: no buffer of this context is ever used from another stream.
        unsafe { ctx.disable_event_tracking() };
        // A stream of our own, not the legacy default stream: only those can be captured.
        let stream = ctx.new_stream().map_err(device)?;
        let ptx = kernel_build::ptx(
            kernel_build::LLAMA_CU,
            ctx.compute_capability().map_err(device)?,
        )?;
        let module = ctx.load_module(ptx).map_err(device)?;
        let f = |name: &str| {
            module
                .load_function(name)
                .map_err(|source| CudaError::Kernel {
                    name: name.to_owned(),
                    source,
                })
        };
        let mut attn_split = Vec::new();
        for hd in [32, 64, 128, 256] {
            for g in [1, 2, 4, 8] {
                let name = format!("attn_split_h{hd}_g{g}");
                let func = f(&name)?;
                let resident = func
                    .occupancy_max_active_blocks_per_multiprocessor(ATTN_THREADS, 0, None)
                    .map_err(|source| CudaError::Kernel { name, source })?;
                attn_split.push((func, resident.max(1) as usize));
            }
        }
        let mut attn_prefill = Vec::new();
        for hd in PREFILL_HEAD_DIMS {
            for g in [1, 2, 4, 8] {
                let name = format!("attn_prefill_h{hd}_g{g}");
                let func = f(&name)?;
                func.set_attribute(
                    cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    prefill_shared_bytes(hd) as i32,
                )
                .map_err(|source| CudaError::Kernel { name, source })?;
                attn_prefill.push(func);
            }
        }
        let k = Kernels {
            embed_rows: f("embed_rows")?,
            f32_to_bf16: f("f32_to_bf16_n")?,
            add_bias: f("add_bias")?,
            add_assign: f("add_assign")?,
            rms_norm: f("rms_norm")?,
            add_rms_norm: f("add_rms_norm")?,
            rope: f("rope")?,
            silu_mul: f("silu_mul")?,
            gather_rows: f("gather_rows")?,
            sample_rows: f("sample_rows")?,
            kv_write: f("kv_write")?,
            attn_merge: f("attn_merge")?,
            attn_merge_rows: f("attn_merge_rows")?,
            attn_split,
            attn_prefill,
        };
        let sms = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(device)? as usize;
        let blas = CudaBlas::new(stream.clone()).map_err(CudaError::Blas)?;
        // SAFETY: cuBLAS only uses it as workspace, on this stream.
        let blas_workspace =
            unsafe { stream.alloc::<u8>(BLAS_WORKSPACE) }.map_err(|source| CudaError::Setup {
                ordinal,
                what: "allocating cuBLAS's workspace",
                source,
            })?;
        {
            let (ws, _w) = blas_workspace.device_ptr(&stream);
            // SAFETY: the workspace lives as long as the handle (both are fields of `Cuda`).
            let set = unsafe {
                blas::cublasSetWorkspace_v2(*blas.handle(), ws as *mut c_void, BLAS_WORKSPACE)
            };
            if set != blas::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                return Err(CudaError::Blas(cudarc::cublas::result::CublasError(set)));
            }
        }
        tracing::info!(
            ordinal,
            gpu = ctx.name().unwrap_or_default(),
            sms,
            "CUDA backend ready"
        );
        Ok(Self {
            ctx,
            stream,
            blas,
            k,
            sms,
            _blas_workspace: blas_workspace,
            widest_input: Cell::new(0),
            replays: RefCell::new(Replays::new(true)),
            graph_launches: Cell::new(0),
            scratch: RefCell::new(Scratch::new()),
            links: RefCell::default(),
        })
    }

    /// Whether decode steps replay recorded CUDA graphs (on by default); off runs every kernel
    /// eagerly, as `--enforce-eager` asks.
    pub fn with_graphs(self, on: bool) -> Self {
        self.replays.borrow_mut().set_on(on);
        self
    }

    /// Recorded parts launched so far: how a test sees that steps did replay.
    pub fn graph_launches(&self) -> u64 {
        self.graph_launches.get()
    }

    /// Where the buffers a recorded part points at are now: a record is replayed only while
    /// this holds.
    fn fingerprint(&self, kv: &CudaKv) -> Vec<u64> {
        let s = self.scratch.borrow();
        let st = &self.stream;
        vec![
            addr(st, s.x_bf16.as_ref()),
            addr(st, s.step_positions.dev.as_ref()),
            addr(st, s.step_slots.dev.as_ref()),
            addr(st, s.inv_freq.dev.as_ref()),
            addr(st, Some(&kv.k)),
            addr(st, Some(&kv.v)),
        ]
    }

    /// Waits for the queued work; for timing and tests.
    pub fn synchronize(&self) {
        ok(self.stream.synchronize(), "synchronize");
    }

    /// Seconds the GPU spends on the work `queue` puts on the stream, between two events, as
    /// PyTorch's benchmarks time it (the host's launch and wait costs stay out).
    pub fn device_seconds(&self, queue: impl FnOnce()) -> f64 {
        let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = ok(self.stream.record_event(timing), "event");
        queue();
        let end = ok(self.stream.record_event(timing), "event");
        f64::from(ok(start.elapsed_ms(&end), "event timing")) / 1e3
    }

    /// Grid for an elementwise kernel over `n` values, 256 threads a block.
    fn elementwise(&self, n: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (n.div_ceil(256).clamp(1, self.sms * 16) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// A launch of an attention kernel with the arguments they all start with pushed.
    fn attention_args<'a>(
        stream: &'a CudaStream,
        kernel: &'a CudaFunction,
        q: &'a CudaSlice<f32>,
        kv: &'a CudaKv,
        c: &'a AttnCommon,
    ) -> LaunchArgs<'a> {
        let mut b = stream.launch_builder(kernel);
        b.arg(q)
            .arg(&c.q_width)
            .arg(&c.q_col)
            .arg(&kv.k)
            .arg(&kv.v)
            .arg(&c.geo)
            .arg(&c.layer)
            .arg(&c.scale);
        b
    }

    #[allow(clippy::too_many_arguments)]
    fn kv_write_on(
        &self,
        lane: Lane,
        kv: &mut CudaKv,
        layer: usize,
        src: &CudaSlice<f32>,
        row_width: usize,
        k_col: usize,
        v_col: usize,
        slots: &[(u32, u32)],
    ) {
        if slots.is_empty() {
            return;
        }
        let flat = flat_slots(slots);
        let s = lane.scratch;
        let slots_dev = staged_or_put(&s.step_slots, &mut s.slots, lane.stream, &flat);
        let g = geom(&kv.shape);
        let (l, rw, kc, vc) = (layer as i32, row_width as i32, k_col as i32, v_col as i32);
        let mut b = lane.stream.launch_builder(&self.k.kv_write);
        b.arg(&mut kv.k)
            .arg(&mut kv.v)
            .arg(src)
            .arg(slots_dev)
            .arg(&g)
            .arg(&l)
            .arg(&rw)
            .arg(&kc)
            .arg(&vc);
        // SAFETY: slots name blocks and tokens inside the cache's shape (the scheduler's tables).
        ok(
            unsafe { b.launch(Self::per_row(slots.len(), 512)) },
            "kv_write",
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn attention_on(
        &self,
        lane: Lane,
        q: &CudaSlice<f32>,
        q_width: usize,
        q_col: usize,
        kv: &CudaKv,
        layer: usize,
        shape: AttnShape,
        seqs: &[AttnSeq],
        out: &mut CudaSlice<f32>,
        lse: &mut CudaSlice<f32>,
    ) {
        let rows = seqs.iter().map(|s| s.rows.end).max().unwrap_or(0);
        if rows == 0 {
            return;
        }
        let (hd, group) = (shape.head_dim, shape.q_heads / shape.kv_heads);
        let (split_kernel, resident) = &self.k.attn_split[match (hd, group) {
            (32 | 64 | 128 | 256, 1 | 2 | 4 | 8) if group * shape.kv_heads == shape.q_heads => {
                (hd / 32).trailing_zeros() as usize * 4 + group.trailing_zeros() as usize
            }
            _ => panic!(
                "the CUDA attention kernel supports head_dim 32/64/128/256 with 1/2/4/8 query \
                 heads per KV head, not head_dim {hd} with {} over {}",
                shape.q_heads, shape.kv_heads
            ),
        }];
        let prefill = PREFILL_HEAD_DIMS.iter().position(|&d| d == hd);
        let tile_rows = match prefill {
            Some(_) if kv.shape.block_tokens <= PREFILL_N => PREFILL_M / group,
            _ => 0,
        };
        let plan = AttnPlan {
            kv_heads: shape.kv_heads,
            tile_rows,
        };
        let sc = lane.scratch;
        let t = &mut sc.attn;
        t.update(lane.stream, seqs, plan, self.sms * resident);
        let (slots, tiles, splits, segs_per_split) = (t.slots, t.tiles, t.splits, t.segs_per_split);
        let [slot_rows, meta, segs, tile_table] = t.device();
        let common = AttnCommon {
            q_width: q_width as i32,
            q_col: q_col as i32,
            geo: geom(&kv.shape),
            layer: layer as i32,
            scale: shape.scale,
        };
        if slots > 0 {
            let part_o = grown(
                lane.stream,
                &mut sc.part_o,
                slots * shape.q_heads * splits * hd,
            );
            let part_lse = grown(
                lane.stream,
                &mut sc.part_lse,
                slots * shape.q_heads * splits,
            );
            let (sps, sp) = (segs_per_split as i32, splits as i32);
            let mut b = Self::attention_args(lane.stream, split_kernel, q, kv, &common);
            b.arg(slot_rows)
                .arg(meta)
                .arg(segs)
                .arg(&sps)
                .arg(&mut *part_o)
                .arg(&mut *part_lse)
                .arg(&sp);
            let cfg = LaunchConfig {
                grid_dim: (slots as u32, shape.kv_heads as u32, splits as u32),
                block_dim: (ATTN_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the metadata tables were built above from `seqs`, whose segments name
            // blocks of this cache; the partial buffers hold slots * q_heads * splits entries.
            ok(unsafe { b.launch(cfg) }, "attention");
            let hdi = hd as i32;
            let mut b = lane.stream.launch_builder(&self.k.attn_merge);
            b.arg(&*part_o)
                .arg(&*part_lse)
                .arg(slot_rows)
                .arg(&sp)
                .arg(&hdi)
                .arg(&mut *out)
                .arg(&mut *lse);
            let cfg = LaunchConfig {
                grid_dim: (slots as u32, shape.q_heads as u32, 1),
                block_dim: (hd as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: every slot names a row below `rows`; out holds rows * q_heads * hd values
            // and lse rows * q_heads.
            ok(unsafe { b.launch(cfg) }, "attention merge");
        }
        if let (Some(p), true) = (prefill, tiles > 0) {
            let kernel = &self.k.attn_prefill[p * 4 + group.trailing_zeros() as usize];
            let nt = tiles as i32;
            let mut b = Self::attention_args(lane.stream, kernel, q, kv, &common);
            b.arg(tile_table)
                .arg(&nt)
                .arg(meta)
                .arg(segs)
                .arg(out)
                .arg(lse);
            let cfg = LaunchConfig {
                grid_dim: (tiles as u32, shape.kv_heads as u32, 1),
                block_dim: (ATTN_THREADS, 1, 1),
                shared_mem_bytes: prefill_shared_bytes(hd) as u32,
            };
            // SAFETY: tiles name rows of `seqs` and their segments blocks of this cache (at
            // most PREFILL_N tokens a block, checked above); out and lse cover every row.
            ok(unsafe { b.launch(cfg) }, "prefill attention");
        }
    }

    fn per_row(rows: usize, threads: u32) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

fn geom(shape: &KvShape) -> KvGeom {
    KvGeom {
        blocks: shape.blocks as i32,
        block_tokens: shape.block_tokens as i32,
        kv_heads: shape.kv_heads as i32,
        head_dim: shape.head_dim as i32,
    }
}

fn to_bf16_bits(data: &[f32]) -> Vec<u16> {
    data.par_iter()
        .map(|&x| half::bf16::from_f32(x).to_bits())
        .collect()
}

impl Backend for Cuda {
    type Buf = CudaSlice<f32>;
    type Weight = CudaWeight;
    type Kv = CudaKv;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn kv_block_bytes(&self, shape: KvShape) -> usize {
        2 * shape.layers * shape.block_floats() * std::mem::size_of::<u16>()
    }

    fn free_memory(&self) -> Option<usize> {
        self.ctx.mem_get_info().ok().map(|(free, _)| free)
    }

    fn weight(&self, rows: usize, cols: usize, data: Vec<f32>) -> CudaWeight {
        assert_eq!(
            rows * cols,
            data.len(),
            "weight shape does not match its data"
        );
        let data = ok(
            self.stream.clone_htod(&to_bf16_bits(&data)),
            "weight upload",
        );
        self.widest_input.set(self.widest_input.get().max(cols));
        CudaWeight { rows, cols, data }
    }

    fn weight_cols(&self, w: &CudaWeight) -> usize {
        w.cols
    }

    fn alloc(&self, len: usize) -> CudaSlice<f32> {
        ok(self.stream.alloc_zeros(len.max(1)), "allocation")
    }

    fn alloc_kv(&self, shape: KvShape) -> CudaKv {
        let n = shape.layers * shape.blocks * shape.block_floats();
        CudaKv {
            shape,
            k: ok(self.stream.alloc_zeros(n), "KV cache allocation"),
            v: ok(self.stream.alloc_zeros(n), "KV cache allocation"),
        }
    }

    fn upload(&self, data: &[f32], out: &mut CudaSlice<f32>) {
        ok(
            self.stream
                .memcpy_htod(data, &mut out.slice_mut(..data.len())),
            "upload",
        );
    }

    fn download(&self, buf: &CudaSlice<f32>, len: usize) -> Vec<f32> {
        ok(self.stream.clone_dtoh(&buf.slice(..len)), "download")
    }

    fn embed(&self, table: &CudaWeight, ids: &[u32], out: &mut CudaSlice<f32>) {
        if ids.is_empty() {
            return;
        }
        let mut s = self.scratch.borrow_mut();
        let ids_dev = s.ids.put(&self.stream, ids);
        let width = table.cols as i32;
        let mut b = self.stream.launch_builder(&self.k.embed_rows);
        b.arg(&table.data).arg(ids_dev).arg(out).arg(&width);
        // SAFETY: ids index rows of the table; out holds ids.len() rows of `width`.
        ok(unsafe { b.launch(Self::per_row(ids.len(), 256)) }, "embed");
    }

    fn linear(
        &self,
        x: &CudaSlice<f32>,
        rows: usize,
        w: &CudaWeight,
        bias: Option<&CudaWeight>,
        out: &mut CudaSlice<f32>,
    ) {
        if rows == 0 {
            return;
        }
        let (n, k) = (w.rows, w.cols);
        let mut s = self.scratch.borrow_mut();
        let xb = grown(&self.stream, &mut s.x_bf16, rows * k);
        let len = (rows * k) as i64;
        let mut b = self.stream.launch_builder(&self.k.f32_to_bf16);
        b.arg(x).arg(&mut *xb).arg(&len);
        // SAFETY: x holds rows * k values and xb at least as many.
        ok(
            unsafe { b.launch(self.elementwise(rows * k)) },
            "bf16 conversion",
        );
        let (alpha, beta) = (1.0f32, 0.0f32);
        {
            let (wp, _w) = w.data.device_ptr(&self.stream);
            let (xp, _x) = xb.device_ptr(&self.stream);
            let (op, _o) = out.device_ptr_mut(&self.stream);
            // Column-major view: out^T [n, rows] = W [n, k] (stored as k x n) ^T * x^T [k, rows].
            // SAFETY: the pointers cover n * k, rows * k and rows * n values on this stream.
            ok(
                unsafe {
                    cudarc::cublas::result::gemm_ex(
                        *self.blas.handle(),
                        blas::cublasOperation_t::CUBLAS_OP_T,
                        blas::cublasOperation_t::CUBLAS_OP_N,
                        n as i32,
                        rows as i32,
                        k as i32,
                        &alpha as *const f32 as *const c_void,
                        wp as *const c_void,
                        blas::cudaDataType::CUDA_R_16BF,
                        k as i32,
                        xp as *const c_void,
                        blas::cudaDataType::CUDA_R_16BF,
                        k as i32,
                        &beta as *const f32 as *const c_void,
                        op as *mut c_void,
                        blas::cudaDataType::CUDA_R_32F,
                        n as i32,
                        blas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                        blas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                    )
                },
                "cuBLAS GEMM",
            );
        }
        if let Some(bias) = bias {
            let (r, wd) = (rows as i32, n as i32);
            let mut b = self.stream.launch_builder(&self.k.add_bias);
            b.arg(&mut *out).arg(&bias.data).arg(&r).arg(&wd);
            // SAFETY: out holds rows * n values and the bias n.
            ok(unsafe { b.launch(self.elementwise(rows * n)) }, "bias");
        }
    }

    fn rms_norm(
        &self,
        x: &CudaSlice<f32>,
        rows: usize,
        w: &CudaWeight,
        eps: f32,
        out: &mut CudaSlice<f32>,
    ) {
        if rows == 0 {
            return;
        }
        let width = w.cols as i32;
        let mut b = self.stream.launch_builder(&self.k.rms_norm);
        b.arg(x).arg(&w.data).arg(out).arg(&width).arg(&eps);
        // SAFETY: x and out hold rows rows of `width`; the kernel's reduction needs <= 1024 threads.
        ok(
            unsafe { b.launch(Self::per_row(rows, NORM_THREADS)) },
            "rms_norm",
        );
    }

    fn add_rms_norm(
        &self,
        acc: &mut CudaSlice<f32>,
        x: &CudaSlice<f32>,
        rows: usize,
        w: &CudaWeight,
        eps: f32,
        out: &mut CudaSlice<f32>,
    ) {
        if rows == 0 {
            return;
        }
        let width = w.cols as i32;
        let mut b = self.stream.launch_builder(&self.k.add_rms_norm);
        b.arg(acc)
            .arg(x)
            .arg(&w.data)
            .arg(out)
            .arg(&width)
            .arg(&eps);
        // SAFETY: acc, x and out hold rows rows of `width`.
        ok(
            unsafe { b.launch(Self::per_row(rows, NORM_THREADS)) },
            "add_rms_norm",
        );
    }

    fn add_assign(&self, acc: &mut CudaSlice<f32>, x: &CudaSlice<f32>, len: usize) {
        if len == 0 {
            return;
        }
        let n = len as i64;
        let mut b = self.stream.launch_builder(&self.k.add_assign);
        b.arg(acc).arg(x).arg(&n);
        // SAFETY: both buffers hold at least len values.
        ok(unsafe { b.launch(self.elementwise(len)) }, "add_assign");
    }

    fn rope(
        &self,
        x: &mut CudaSlice<f32>,
        row_width: usize,
        heads: usize,
        head_dim: usize,
        positions: &[u32],
        inv_freq: &[f32],
    ) {
        if positions.is_empty() {
            return;
        }
        assert!(
            head_dim <= 512,
            "the rope kernel holds the angles of head_dim <= 512, not {head_dim}"
        );
        let mut s = self.scratch.borrow_mut();
        let s = &mut *s;
        let pos = staged_or_put(&s.step_positions, &mut s.positions, &self.stream, positions);
        let freq = s.inv_freq.put(&self.stream, inv_freq);
        let (rw, h, hd) = (row_width as i32, heads as i32, head_dim as i32);
        let mut b = self.stream.launch_builder(&self.k.rope);
        b.arg(x).arg(pos).arg(freq).arg(&rw).arg(&h).arg(&hd);
        // SAFETY: x holds positions.len() rows of row_width >= heads * head_dim.
        ok(
            unsafe { b.launch(Self::per_row(positions.len(), 512)) },
            "rope",
        );
    }

    fn silu_mul(&self, x: &CudaSlice<f32>, rows: usize, width: usize, out: &mut CudaSlice<f32>) {
        if rows == 0 {
            return;
        }
        let (r, w) = (rows as i32, width as i32);
        let mut b = self.stream.launch_builder(&self.k.silu_mul);
        b.arg(x).arg(out).arg(&r).arg(&w);
        // SAFETY: x holds rows * 2 width values, out rows * width.
        ok(
            unsafe { b.launch(self.elementwise(rows * width)) },
            "silu_mul",
        );
    }

    fn kv_write(
        &self,
        kv: &mut CudaKv,
        layer: usize,
        src: &CudaSlice<f32>,
        row_width: usize,
        k_col: usize,
        v_col: usize,
        slots: &[(u32, u32)],
    ) {
        let lane = Lane {
            stream: &self.stream,
            scratch: &mut self.scratch.borrow_mut(),
        };
        self.kv_write_on(lane, kv, layer, src, row_width, k_col, v_col, slots);
    }

    fn kv_read_block(&self, kv: &CudaKv, block: u32) -> Vec<f32> {
        let n = kv.shape.block_floats();
        let mut out = Vec::with_capacity(2 * kv.shape.layers * n);
        for layer in 0..kv.shape.layers {
            let at = (layer * kv.shape.blocks + block as usize) * n;
            for side in [&kv.k, &kv.v] {
                let bits = ok(
                    self.stream.clone_dtoh(&side.slice(at..at + n)),
                    "KV block read",
                );
                out.extend(bits.into_iter().map(|b| half::bf16::from_bits(b).to_f32()));
            }
        }
        out
    }

    fn kv_write_block(&self, kv: &mut CudaKv, block: u32, data: &[f32]) {
        let n = kv.shape.block_floats();
        assert_eq!(
            data.len(),
            2 * kv.shape.layers * n,
            "one rBlock of every layer"
        );
        for (layer, pair) in data.chunks_exact(2 * n).enumerate() {
            let at = (layer * kv.shape.blocks + block as usize) * n;
            // Values read from a bf16 cache convert back exactly.
            let (k, v) = (to_bf16_bits(&pair[..n]), to_bf16_bits(&pair[n..]));
            ok(
                self.stream.memcpy_htod(&k, &mut kv.k.slice_mut(at..at + n)),
                "KV block write",
            );
            ok(
                self.stream.memcpy_htod(&v, &mut kv.v.slice_mut(at..at + n)),
                "KV block write",
            );
        }
    }

    fn attention(
        &self,
        q: &CudaSlice<f32>,
        q_width: usize,
        q_col: usize,
        kv: &CudaKv,
        layer: usize,
        shape: AttnShape,
        seqs: &[AttnSeq],
        out: &mut CudaSlice<f32>,
        lse: &mut CudaSlice<f32>,
    ) {
        let lane = Lane {
            stream: &self.stream,
            scratch: &mut self.scratch.borrow_mut(),
        };
        self.attention_on(lane, q, q_width, q_col, kv, layer, shape, seqs, out, lse);
    }

    fn sample_rows(
        &self,
        x: &CudaSlice<f32>,
        rows: usize,
        width: usize,
        draws: &[RowDraw],
    ) -> Vec<u32> {
        if rows == 0 {
            return Vec::new();
        }
        assert_eq!(draws.len(), rows, "one draw per row");
        let mut s = self.scratch.borrow_mut();
        let s = &mut *s;
        let draws_dev = s.draws.put(&self.stream, draws);
        let picks = grown(&self.stream, &mut s.picks, rows);
        let w = width as i32;
        let mut b = self.stream.launch_builder(&self.k.sample_rows);
        b.arg(x).arg(draws_dev).arg(&mut *picks).arg(&w);
        // SAFETY: x holds rows rows of `width`, draws and picks at least rows entries.
        ok(
            unsafe { b.launch(Self::per_row(rows, 1024)) },
            "sample_rows",
        );
        ok(self.stream.clone_dtoh(&picks.slice(..rows)), "download")
    }

    fn has_links(&self) -> bool {
        super::nccl::available()
    }

    fn link_offer(&self) -> Option<Result<(DeviceLink, Vec<u8>), LinkError>> {
        Some(self.offer_link())
    }

    fn link_accept(&self, id: &[u8]) -> Result<DeviceLink, LinkError> {
        self.accept_link(id)
    }

    fn link_call(
        &self,
        x: &CudaSlice<f32>,
        width: usize,
        calls: &[(&DeviceLink, &[usize])],
        out_width: usize,
        heads: usize,
    ) -> Result<(), LinkError> {
        self.call_links(x, width, calls, out_width, heads)
    }

    fn link_merge(
        &self,
        calls: &[(&DeviceLink, &[usize])],
        out: &mut CudaSlice<f32>,
        lse: &mut CudaSlice<f32>,
        heads: usize,
        head_dim: usize,
    ) -> Result<(), LinkError> {
        self.merge_links(calls, out, lse, heads, head_dim)
    }

    fn link_settled(&self, links: &[&DeviceLink]) -> Result<bool, LinkError> {
        self.links_settled(links)
    }

    fn link_serve(
        &self,
        link: &DeviceLink,
        kv: &mut CudaKv,
        layers: std::ops::Range<usize>,
        shape: AttnShape,
        seqs: &[AttnSeq],
        slots: &[(u32, u32)],
    ) -> Result<(), LinkError> {
        self.serve_link(link, kv, layers, shape, seqs, slots)
    }

    fn link_move(
        &self,
        link: &DeviceLink,
        kv: &mut CudaKv,
        blocks: &[u32],
        send: bool,
    ) -> Result<(), LinkError> {
        self.move_blocks(link, kv, blocks, send)
    }

    fn link_moved(&self, link: &DeviceLink) -> Result<bool, LinkError> {
        self.blocks_moved(link)
    }

    fn stage_step(&self, kv: &CudaKv, positions: &[u32], slots: &[(u32, u32)], inv_freq: &[f32]) {
        {
            let mut s = self.scratch.borrow_mut();
            let s = &mut *s;
            s.step_positions.put(&self.stream, positions);
            s.step_slots.put(&self.stream, &flat_slots(slots));
            s.inv_freq.put(&self.stream, inv_freq);
            // Sized now, so that no part of the step allocates while it is recorded.
            grown(
                &self.stream,
                &mut s.x_bf16,
                positions.len() * self.widest_input.get(),
            );
        }
        let fingerprint = self.fingerprint(kv);
        self.replays.borrow_mut().step(positions.len(), fingerprint);
    }

    fn replay(&self, key: ReplayKey, queue: &mut dyn FnMut()) {
        let replays = self.replays.borrow();
        let launch = |graph: &CudaGraph| {
            ok(graph.launch(), "graph launch");
            self.graph_launches.set(self.graph_launches.get() + 1);
        };
        match replays.decide(key) {
            Decision::Replay(graph) => launch(&graph.0),
            Decision::Eager => {
                drop(replays);
                queue();
            }
            Decision::Record => {
                drop(replays);
                // Thread-local: other threads (NCCL's) may go on calling CUDA meanwhile.
                ok(
                    self.stream.begin_capture(
                        cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
                    ),
                    "graph capture",
                );
                queue();
                let graph = ok(
                    self.stream
                        .end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0)),
                    "graph capture",
                );
                match graph {
                    // Captured work is not run: the first replay runs it.
                    Some(graph) => {
                        launch(&graph);
                        self.replays.borrow_mut().keep(key, Graph(graph));
                    }
                    None => queue(),
                }
            }
        }
    }

    fn forget_replays(&self) {
        self.replays.borrow_mut().forget();
    }

    fn gather_rows(
        &self,
        x: &CudaSlice<f32>,
        width: usize,
        rows: &[usize],
        out: &mut CudaSlice<f32>,
    ) {
        if rows.is_empty() {
            return;
        }
        let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let mut s = self.scratch.borrow_mut();
        let idx_dev = s.rows.put(&self.stream, &idx);
        let w = width as i32;
        let mut b = self.stream.launch_builder(&self.k.gather_rows);
        b.arg(x).arg(idx_dev).arg(out).arg(&w);
        // SAFETY: every index names a row of x; out holds rows.len() rows.
        ok(
            unsafe { b.launch(Self::per_row(rows.len(), 256)) },
            "gather_rows",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::splits_for;

    #[test]
    fn splits_fill_the_last_wave() {
        // One long row on 8 KV heads, 396 blocks a wave: 48 splits make 384 blocks.
        assert_eq!(splits_for(8, 396, 8192), 48);
        // 512 blocks are 1.3 waves unsplit; 3 splits are 3.9 waves.
        assert_eq!(splits_for(512, 396, 256), 3);
        // Short rows cannot be split further than their segments.
        assert_eq!(splits_for(8, 396, 4), 4);
        // A grid of whole waves needs no split.
        assert_eq!(splits_for(792, 396, 100), 1);
    }
}
