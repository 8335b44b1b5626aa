//! The CUDA backend: cuBLAS for the projections (bf16 operands, f32 accumulation and output) and
//! the kernels of `kernels/llama.cu` for the rest, all on one stream.
//!
//! Weights and the KV cache are bf16, activations f32. The KV cache keeps the CPU backend's
//! layout, `[layer][block][kv_head][token][dim]` for K and for V. Small per-step tables (token
//! ids, positions, KV slots, attention metadata) are uploaded only when they change, so the
//! layers of one step share one upload and a decode step allocates nothing once warm.

use std::cell::RefCell;
use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublas::{CudaBlas, sys as blas};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr,
    DriverError, LaunchConfig, PushKernelArg,
};
use rayon::prelude::*;

use super::kernel_build::{self, BuildError};
use super::{AttnSeq, AttnShape, Backend, KvShape, NO_SLOT};

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
}

/// Whether this machine can run the CUDA backend at all: a driver library and a GPU.
pub fn available() -> bool {
    // SAFETY: only probes whether the driver library can be opened.
    let present = unsafe { cudarc::driver::sys::is_culib_present() };
    present && CudaContext::device_count().is_ok_and(|n| n > 0)
}

/// Threads of the attention kernel's blocks (kernels/llama.cu: WARPS * 32).
const ATTN_THREADS: u32 = 128;
/// Blocks per multiprocessor the attention split aims for: enough KV reads in flight.
const ATTN_BLOCKS_PER_SM: usize = 8;

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
    argmax_rows: CudaFunction,
    kv_write: CudaFunction,
    attn_merge: CudaFunction,
    /// `attn_split_h{head_dim}_g{query heads per kv head}`, indexed by log2(head_dim / 32) and
    /// log2(group).
    attn_split: Vec<CudaFunction>,
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

/// Device scratch that grows to the largest step and is then reused.
struct Scratch {
    ids: Table<u32>,
    positions: Table<u32>,
    inv_freq: Table<f32>,
    slots: Table<u32>,
    rows: Table<u32>,
    attn: AttnTables,
    x_bf16: Option<CudaSlice<u16>>,
    picks: Option<CudaSlice<u32>>,
    part_o: Option<CudaSlice<f32>>,
    part_lse: Option<CudaSlice<f32>>,
}

/// The attention metadata of one set of sequences, on the device. Every layer of a step attends
/// over the same sequences, so the tables are built and uploaded once a step, not once a layer.
///
/// `row_seq[row]` names the row's sequence (rows outside every sequence point at an empty one,
/// so they come out as 0 and -inf); `meta` holds (first_row, first_row_pos, first_segment,
/// segments) per sequence; `segs` holds (block, first_pos, tokens) per segment.
struct AttnTables {
    /// What the tables were built from, and the grid they were split for.
    seqs: Vec<AttnSeq>,
    blocks: usize,
    splits: usize,
    segs_per_split: usize,
    row_seq: Table<u32>,
    meta: Table<u32>,
    segs: Table<u32>,
}

impl AttnTables {
    const fn new() -> Self {
        Self {
            seqs: Vec::new(),
            blocks: 0,
            splits: 1,
            segs_per_split: 1,
            row_seq: Table::new(),
            meta: Table::new(),
            segs: Table::new(),
        }
    }

    /// Rebuilds the tables when `seqs` differ from the last ones; `blocks` is rows x KV heads.
    fn update(&mut self, stream: &Arc<CudaStream>, seqs: &[AttnSeq], blocks: usize, sms: usize) {
        if self.seqs == seqs && self.blocks == blocks {
            return;
        }
        let rows = seqs.iter().map(|s| s.rows.end).max().unwrap_or(0);
        let empty = seqs.len() as u32;
        let mut row_seq = vec![empty; rows];
        let mut meta = Vec::with_capacity(4 * (seqs.len() + 1));
        let mut segs = Vec::new();
        let mut most_segs = 1;
        for (i, s) in seqs.iter().enumerate() {
            row_seq[s.rows.clone()].fill(i as u32);
            meta.extend([
                s.rows.start as u32,
                s.first_row_pos,
                (segs.len() / 3) as u32,
                s.segments.len() as u32,
            ]);
            for g in &s.segments {
                segs.extend([g.block, g.first_pos, g.tokens]);
            }
            most_segs = most_segs.max(s.segments.len());
        }
        meta.extend([0, 0, 0, 0]);
        // Split the KV length until the grid fills the GPU; a long context alone still does.
        let want_splits = (sms * ATTN_BLOCKS_PER_SM).div_ceil(blocks).max(1);
        self.segs_per_split = most_segs.div_ceil(want_splits.min(most_segs));
        self.splits = most_segs.div_ceil(self.segs_per_split);
        self.row_seq.put(stream, &row_seq);
        self.meta.put(stream, &meta);
        self.segs.put(stream, &segs);
        self.seqs = seqs.to_vec();
        self.blocks = blocks;
    }

    fn device(&self) -> (&CudaSlice<u32>, &CudaSlice<u32>, &CudaSlice<u32>) {
        fn dev(t: &Table<u32>) -> &CudaSlice<u32> {
            t.dev.as_ref().expect("uploaded by update")
        }
        (dev(&self.row_seq), dev(&self.meta), dev(&self.segs))
    }
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

/// A device fault leaves the context unusable; the engine cannot go on after one.
fn ok<T, E: std::fmt::Debug>(r: Result<T, E>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("CUDA {what} failed: {e:?}"))
}

pub struct Cuda {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    k: Kernels,
    sms: usize,
    scratch: RefCell<Scratch>,
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
        let stream = ctx.default_stream();
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
                attn_split.push(f(&format!("attn_split_h{hd}_g{g}"))?);
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
            argmax_rows: f("argmax_rows")?,
            kv_write: f("kv_write")?,
            attn_merge: f("attn_merge")?,
            attn_split,
        };
        let sms = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(device)? as usize;
        let blas = CudaBlas::new(stream.clone()).map_err(CudaError::Blas)?;
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
            scratch: RefCell::new(Scratch {
                ids: Table::new(),
                positions: Table::new(),
                inv_freq: Table::new(),
                slots: Table::new(),
                rows: Table::new(),
                attn: AttnTables::new(),
                x_bf16: None,
                picks: None,
                part_o: None,
                part_lse: None,
            }),
        })
    }

    /// Waits for the queued work; for timing and tests.
    pub fn synchronize(&self) {
        ok(self.stream.synchronize(), "synchronize");
    }

    /// Grid for an elementwise kernel over `n` values, 256 threads a block.
    fn elementwise(&self, n: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (n.div_ceil(256).clamp(1, self.sms * 16) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
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
        ok(unsafe { b.launch(Self::per_row(rows, 256)) }, "rms_norm");
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
            unsafe { b.launch(Self::per_row(rows, 256)) },
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
        let mut s = self.scratch.borrow_mut();
        let s = &mut *s;
        let pos = s.positions.put(&self.stream, positions);
        let freq = s.inv_freq.put(&self.stream, inv_freq);
        let (rw, h, hd) = (row_width as i32, heads as i32, head_dim as i32);
        let mut b = self.stream.launch_builder(&self.k.rope);
        b.arg(x).arg(pos).arg(freq).arg(&rw).arg(&h).arg(&hd);
        // SAFETY: x holds positions.len() rows of row_width >= heads * head_dim.
        ok(
            unsafe { b.launch(Self::per_row(positions.len(), 128)) },
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
        if slots.is_empty() {
            return;
        }
        let flat: Vec<u32> = slots
            .iter()
            .flat_map(|&(b, t)| {
                if (b, t) == NO_SLOT {
                    [u32::MAX, 0]
                } else {
                    [b, t]
                }
            })
            .collect();
        let mut s = self.scratch.borrow_mut();
        let slots_dev = s.slots.put(&self.stream, &flat);
        let g = geom(&kv.shape);
        let (l, rw, kc, vc) = (layer as i32, row_width as i32, k_col as i32, v_col as i32);
        let mut b = self.stream.launch_builder(&self.k.kv_write);
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
            unsafe { b.launch(Self::per_row(slots.len(), 128)) },
            "kv_write",
        );
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
        let rows = seqs.iter().map(|s| s.rows.end).max().unwrap_or(0);
        if rows == 0 {
            return;
        }
        let (hd, group) = (shape.head_dim, shape.q_heads / shape.kv_heads);
        let variant = match (hd, group) {
            (32 | 64 | 128 | 256, 1 | 2 | 4 | 8) if group * shape.kv_heads == shape.q_heads => {
                (hd / 32).trailing_zeros() as usize * 4 + group.trailing_zeros() as usize
            }
            _ => panic!(
                "the CUDA attention kernel supports head_dim 32/64/128/256 with 1/2/4/8 query \
                 heads per KV head, not head_dim {hd} with {} over {}",
                shape.q_heads, shape.kv_heads
            ),
        };
        let mut sc = self.scratch.borrow_mut();
        let sc = &mut *sc;
        let t = &mut sc.attn;
        t.update(&self.stream, seqs, rows * shape.kv_heads, self.sms);
        let (splits, segs_per_split) = (t.splits, t.segs_per_split);
        let (row_seq, meta, segs) = t.device();
        let part_o = grown(
            &self.stream,
            &mut sc.part_o,
            rows * shape.q_heads * splits * hd,
        );
        let part_lse = grown(
            &self.stream,
            &mut sc.part_lse,
            rows * shape.q_heads * splits,
        );
        let g = geom(&kv.shape);
        let (qw, qc, l, sps, sp) = (
            q_width as i32,
            q_col as i32,
            layer as i32,
            segs_per_split as i32,
            splits as i32,
        );
        let mut b = self.stream.launch_builder(&self.k.attn_split[variant]);
        b.arg(q)
            .arg(&qw)
            .arg(&qc)
            .arg(&kv.k)
            .arg(&kv.v)
            .arg(&g)
            .arg(&l)
            .arg(&shape.scale)
            .arg(row_seq)
            .arg(meta)
            .arg(segs)
            .arg(&sps)
            .arg(&mut *part_o)
            .arg(&mut *part_lse)
            .arg(&sp);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, shape.kv_heads as u32, splits as u32),
            block_dim: (ATTN_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the metadata tables were built above from `seqs`, whose segments name blocks
        // of this cache; the partial buffers hold rows * q_heads * splits entries.
        ok(unsafe { b.launch(cfg) }, "attention");
        let (spl, hdi) = (splits as i32, hd as i32);
        let mut b = self.stream.launch_builder(&self.k.attn_merge);
        b.arg(&*part_o)
            .arg(&*part_lse)
            .arg(&spl)
            .arg(&hdi)
            .arg(out)
            .arg(lse);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, shape.q_heads as u32, 1),
            block_dim: (hd as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: out holds rows * q_heads * hd values and lse rows * q_heads.
        ok(unsafe { b.launch(cfg) }, "attention merge");
    }

    fn argmax_rows(&self, x: &CudaSlice<f32>, rows: usize, width: usize) -> Vec<u32> {
        if rows == 0 {
            return Vec::new();
        }
        let mut s = self.scratch.borrow_mut();
        let picks = grown(&self.stream, &mut s.picks, rows);
        let w = width as i32;
        let mut b = self.stream.launch_builder(&self.k.argmax_rows);
        b.arg(x).arg(&mut *picks).arg(&w);
        // SAFETY: x holds rows rows of `width`, picks at least rows entries.
        ok(
            unsafe { b.launch(Self::per_row(rows, 1024)) },
            "argmax_rows",
        );
        ok(self.stream.clone_dtoh(&picks.slice(..rows)), "download")
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
