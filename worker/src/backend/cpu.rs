//! The CPU backend: `gemm` for the projections, `rayon` for everything row- or head-parallel.

use gemm::Parallelism;
use rayon::prelude::*;

use super::vector_math::dot;
use super::{AttnSeq, AttnShape, Backend, KvShape, NO_SLOT, cpu_attention};

pub struct Cpu {
    threads: usize,
}

impl Cpu {
    pub fn new() -> Self {
        Self {
            threads: rayon::current_num_threads(),
        }
    }
}

impl Default for Cpu {
    fn default() -> Self {
        Self::new()
    }
}

pub struct CpuWeight {
    rows: usize,
    cols: usize,
    data: Vec<f32>,
}

/// K and V of every layer and rBlock, laid out `[layer][block][kv_head][token][dim]` so that one
/// head of one block is contiguous for attention.
pub struct CpuKv {
    pub(super) shape: KvShape,
    pub(super) k: Vec<f32>,
    pub(super) v: Vec<f32>,
}

impl CpuKv {
    /// Offset of token `t` of head `h` of `block` in `layer`.
    pub(super) fn offset(&self, layer: usize, block: usize, h: usize, t: usize) -> usize {
        let s = &self.shape;
        (((layer * s.blocks + block) * s.kv_heads + h) * s.block_tokens + t) * s.head_dim
    }
}

/// Work below which a projection runs single-threaded inside gemm: threading a thin matrix
/// costs more than it saves.
const GEMM_PARALLEL_MIN_WORK: usize = 1 << 16;

impl Backend for Cpu {
    type Buf = Vec<f32>;
    type Weight = CpuWeight;
    type Kv = CpuKv;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn weight(&self, rows: usize, cols: usize, data: Vec<f32>) -> CpuWeight {
        assert_eq!(
            rows * cols,
            data.len(),
            "weight shape does not match its data"
        );
        CpuWeight { rows, cols, data }
    }

    fn weight_cols(&self, w: &CpuWeight) -> usize {
        w.cols
    }

    fn alloc(&self, len: usize) -> Vec<f32> {
        vec![0.0; len]
    }

    fn alloc_kv(&self, shape: KvShape) -> CpuKv {
        let n = shape.layers * shape.blocks * shape.block_floats();
        CpuKv {
            shape,
            k: vec![0.0; n],
            v: vec![0.0; n],
        }
    }

    fn upload(&self, data: &[f32], out: &mut Vec<f32>) {
        out[..data.len()].copy_from_slice(data);
    }

    fn download(&self, buf: &Vec<f32>, len: usize) -> Vec<f32> {
        buf[..len].to_vec()
    }

    fn embed(&self, table: &CpuWeight, ids: &[u32], out: &mut Vec<f32>) {
        let d = table.cols;
        for (r, &id) in ids.iter().enumerate() {
            let id = id as usize;
            out[r * d..(r + 1) * d].copy_from_slice(&table.data[id * d..(id + 1) * d]);
        }
    }

    fn linear(
        &self,
        x: &Vec<f32>,
        rows: usize,
        w: &CpuWeight,
        bias: Option<&CpuWeight>,
        out: &mut Vec<f32>,
    ) {
        let (n, k) = (w.rows, w.cols);
        assert!(x.len() >= rows * k && out.len() >= rows * n);
        if rows <= GEMV_MAX_ROWS {
            gemv(&x[..rows * k], rows, w, &mut out[..rows * n]);
        } else {
            gemm_f32(&x[..rows * k], rows, w, &mut out[..rows * n], self.threads);
        }
        if let Some(b) = bias {
            out[..rows * n]
                .par_chunks_mut(n)
                .for_each(|row| row.iter_mut().zip(&b.data).for_each(|(o, b)| *o += b));
        }
    }

    fn rms_norm(&self, x: &Vec<f32>, rows: usize, w: &CpuWeight, eps: f32, out: &mut Vec<f32>) {
        let d = w.data.len();
        out[..rows * d]
            .par_chunks_mut(d)
            .zip(x[..rows * d].par_chunks(d))
            .for_each(|(o, x)| {
                let ms = x.iter().map(|v| v * v).sum::<f32>() / d as f32;
                let inv = 1.0 / (ms + eps).sqrt();
                for ((o, x), w) in o.iter_mut().zip(x).zip(&w.data) {
                    *o = x * inv * w;
                }
            });
    }

    fn add_assign(&self, acc: &mut Vec<f32>, x: &Vec<f32>, len: usize) {
        acc[..len]
            .par_chunks_mut(4096)
            .zip(x[..len].par_chunks(4096))
            .for_each(|(a, x)| a.iter_mut().zip(x).for_each(|(a, x)| *a += x));
    }

    fn rope(
        &self,
        x: &mut Vec<f32>,
        row_width: usize,
        heads: usize,
        head_dim: usize,
        positions: &[u32],
        inv_freq: &[f32],
    ) {
        let half = head_dim / 2;
        x[..positions.len() * row_width]
            .par_chunks_mut(row_width)
            .zip(positions.par_iter())
            .for_each(|(row, &pos)| {
                // Angles in f64: at long positions f32 products lose the low bits.
                let (sin, cos): (Vec<f32>, Vec<f32>) = inv_freq
                    .iter()
                    .map(|&f| {
                        let a = pos as f64 * f as f64;
                        (a.sin() as f32, a.cos() as f32)
                    })
                    .unzip();
                for h in 0..heads {
                    let head = &mut row[h * head_dim..(h + 1) * head_dim];
                    let (a, b) = head.split_at_mut(half);
                    for i in 0..half {
                        let (x1, x2) = (a[i], b[i]);
                        a[i] = x1 * cos[i] - x2 * sin[i];
                        b[i] = x2 * cos[i] + x1 * sin[i];
                    }
                }
            });
    }

    fn silu_mul(&self, x: &Vec<f32>, rows: usize, width: usize, out: &mut Vec<f32>) {
        out[..rows * width]
            .par_chunks_mut(width)
            .zip(x[..rows * 2 * width].par_chunks(2 * width))
            .for_each(|(o, x)| {
                let (g, u) = x.split_at(width);
                for ((o, g), u) in o.iter_mut().zip(g).zip(u) {
                    *o = g / (1.0 + (-g).exp()) * u;
                }
            });
    }

    fn kv_write(
        &self,
        kv: &mut CpuKv,
        layer: usize,
        src: &Vec<f32>,
        row_width: usize,
        k_col: usize,
        v_col: usize,
        slots: &[(u32, u32)],
    ) {
        let (heads, hd) = (kv.shape.kv_heads, kv.shape.head_dim);
        for (r, &(block, t)) in slots.iter().enumerate() {
            if (block, t) == NO_SLOT {
                continue;
            }
            let row = &src[r * row_width..(r + 1) * row_width];
            for h in 0..heads {
                let at = kv.offset(layer, block as usize, h, t as usize);
                kv.k[at..at + hd].copy_from_slice(&row[k_col + h * hd..k_col + (h + 1) * hd]);
                kv.v[at..at + hd].copy_from_slice(&row[v_col + h * hd..v_col + (h + 1) * hd]);
            }
        }
    }

    fn kv_read_block(&self, kv: &CpuKv, block: u32) -> Vec<f32> {
        let n = kv.shape.block_floats();
        let mut out = Vec::with_capacity(2 * kv.shape.layers * n);
        for layer in 0..kv.shape.layers {
            let at = kv.offset(layer, block as usize, 0, 0);
            out.extend_from_slice(&kv.k[at..at + n]);
            out.extend_from_slice(&kv.v[at..at + n]);
        }
        out
    }

    fn kv_write_block(&self, kv: &mut CpuKv, block: u32, data: &[f32]) {
        let n = kv.shape.block_floats();
        assert_eq!(
            data.len(),
            2 * kv.shape.layers * n,
            "one rBlock of every layer"
        );
        for (layer, kv_pair) in data.chunks_exact(2 * n).enumerate() {
            let at = kv.offset(layer, block as usize, 0, 0);
            kv.k[at..at + n].copy_from_slice(&kv_pair[..n]);
            kv.v[at..at + n].copy_from_slice(&kv_pair[n..]);
        }
    }

    fn attention(
        &self,
        q: &Vec<f32>,
        q_width: usize,
        q_col: usize,
        kv: &CpuKv,
        layer: usize,
        shape: AttnShape,
        seqs: &[AttnSeq],
        out: &mut Vec<f32>,
        lse: &mut Vec<f32>,
    ) {
        cpu_attention::attention(q, q_width, q_col, kv, layer, shape, seqs, out, lse);
    }

    fn gather_rows(&self, x: &Vec<f32>, width: usize, rows: &[usize], out: &mut Vec<f32>) {
        for (i, &r) in rows.iter().enumerate() {
            out[i * width..(i + 1) * width].copy_from_slice(&x[r * width..(r + 1) * width]);
        }
    }
}

/// Up to this many rows a projection streams the weight matrix once, split over threads by
/// output features, computing a few dot products per weight row: decode at small batch is bound
/// by reading the weights, and this reads them at memory speed.
const GEMV_MAX_ROWS: usize = 4;

/// Output features per task: enough work to amortize scheduling it.
const GEMV_FEATURES_PER_TASK: usize = 64;

fn gemv(x: &[f32], rows: usize, w: &CpuWeight, out: &mut [f32]) {
    let (n, k) = (w.rows, w.cols);
    // Feature-major scratch so each task writes one contiguous chunk; transposed at the end.
    let mut by_feature = vec![0.0f32; n * rows];
    by_feature
        .par_chunks_mut(GEMV_FEATURES_PER_TASK * rows)
        .zip(w.data.par_chunks(GEMV_FEATURES_PER_TASK * k))
        .for_each(|(o, wc)| {
            for (o, wr) in o.chunks_mut(rows).zip(wc.chunks(k)) {
                for (r, o) in o.iter_mut().enumerate() {
                    *o = dot(&x[r * k..(r + 1) * k], wr);
                }
            }
        });
    for r in 0..rows {
        for j in 0..n {
            out[r * n + j] = by_feature[j * rows + r];
        }
    }
}

fn gemm_f32(x: &[f32], rows: usize, w: &CpuWeight, out: &mut [f32], threads: usize) {
    let (n, k) = (w.rows, w.cols);
    let par = if rows * n * k >= GEMM_PARALLEL_MIN_WORK && threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: the callers' slices bound every access: dst is rows x n (row stride n), lhs is
    // rows x k (row stride k), rhs is w^T, read through w's row-major [n, k] storage.
    unsafe {
        gemm::gemm(
            rows,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.data.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}
