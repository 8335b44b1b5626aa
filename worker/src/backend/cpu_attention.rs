//! MicroAttention on the CPU: paged, causal by position, GQA-aware, split over the KV length.
//!
//! Work is cut into tasks of (query row, KV head, a run of rBlocks). Each task reads its K and V
//! once for all the query heads of the group, and returns a partial (output, log-sum-exp) per head;
//! partials of one row and head are then merged exactly (`merge.rs`), which is what lets a long
//! context use every core even at batch 1.

use rayon::prelude::*;

use super::cpu::CpuKv;
use super::{AttnSeq, AttnShape};
use crate::merge::merge_into;

/// Tokens one task reads at most (a few rBlocks): small enough to spread a long context over
/// all cores, large enough that merging costs nothing.
const SPLIT_TOKENS: u32 = 512;

struct Task {
    row: usize,
    kv_head: usize,
    q_pos: u32,
    seq: usize,
    segments: std::ops::Range<usize>,
}

#[allow(clippy::too_many_arguments)]
pub(super) fn attention(
    q: &[f32],
    q_width: usize,
    q_col: usize,
    kv: &CpuKv,
    layer: usize,
    shape: AttnShape,
    seqs: &[AttnSeq],
    out: &mut [f32],
    lse: &mut [f32],
) {
    let group = shape.q_heads / shape.kv_heads;
    let hd = shape.head_dim;
    let mut tasks = Vec::new();
    for (s, seq) in seqs.iter().enumerate() {
        let splits = split_segments(seq);
        for (i, row) in seq.rows.clone().enumerate() {
            let q_pos = seq.first_row_pos + i as u32;
            for kv_head in 0..shape.kv_heads {
                for r in &splits {
                    if seq.segments[r.start].first_pos <= q_pos {
                        tasks.push(Task {
                            row,
                            kv_head,
                            q_pos,
                            seq: s,
                            segments: r.clone(),
                        });
                    }
                }
            }
        }
    }
    let partials: Vec<(Vec<f32>, Vec<f32>)> = tasks
        .par_iter()
        .map(|t| {
            let qrow = &q[t.row * q_width + q_col..];
            let qg = &qrow[t.kv_head * group * hd..(t.kv_head + 1) * group * hd];
            attend(qg, group, kv, layer, t, &seqs[t.seq], shape)
        })
        .collect();

    let width = shape.q_heads * hd;
    for seq in seqs {
        for row in seq.rows.clone() {
            out[row * width..(row + 1) * width].fill(0.0);
            lse[row * shape.q_heads..(row + 1) * shape.q_heads].fill(f32::NEG_INFINITY);
        }
    }
    for (t, (o, l)) in tasks.iter().zip(&partials) {
        for g in 0..group {
            let h = t.kv_head * group + g;
            let acc = &mut out[t.row * width + h * hd..t.row * width + (h + 1) * hd];
            merge_into(acc, &mut lse[t.row * shape.q_heads + h], &o[g * hd..(g + 1) * hd], l[g]);
        }
    }
}

fn split_segments(seq: &AttnSeq) -> Vec<std::ops::Range<usize>> {
    let mut splits = Vec::new();
    let mut start = 0;
    let mut tokens = 0;
    for (i, s) in seq.segments.iter().enumerate() {
        if tokens > 0 && tokens + s.tokens > SPLIT_TOKENS {
            splits.push(start..i);
            start = i;
            tokens = 0;
        }
        tokens += s.tokens;
    }
    if start < seq.segments.len() {
        splits.push(start..seq.segments.len());
    }
    splits
}

/// Partial attention of the `group` query heads in `qg` over the task's segments.
fn attend(
    qg: &[f32],
    group: usize,
    kv: &CpuKv,
    layer: usize,
    t: &Task,
    seq: &AttnSeq,
    shape: AttnShape,
) -> (Vec<f32>, Vec<f32>) {
    let hd = shape.head_dim;
    let segments = &seq.segments[t.segments.clone()];
    let visible: usize = segments
        .iter()
        .map(|s| visible_tokens(s.first_pos, s.tokens, t.q_pos) as usize)
        .sum();
    let mut scores = vec![0.0f32; group * visible];
    let mut n = 0;
    for s in segments {
        for tok in 0..visible_tokens(s.first_pos, s.tokens, t.q_pos) as usize {
            let at = kv.offset(layer, s.block as usize, t.kv_head, tok);
            let k = &kv.k[at..at + hd];
            for g in 0..group {
                scores[g * visible + n] = dot(&qg[g * hd..(g + 1) * hd], k) * shape.scale;
            }
            n += 1;
        }
    }
    let mut o = vec![0.0f32; group * hd];
    let mut lse = vec![f32::NEG_INFINITY; group];
    if visible == 0 {
        return (o, lse);
    }
    for g in 0..group {
        let s = &mut scores[g * visible..(g + 1) * visible];
        let m = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut l = 0.0f32;
        for x in s.iter_mut() {
            *x = (*x - m).exp();
            l += *x;
        }
        lse[g] = m + l.ln();
        let inv = 1.0 / l;
        s.iter_mut().for_each(|x| *x *= inv);
    }
    let mut n = 0;
    for s in segments {
        for tok in 0..visible_tokens(s.first_pos, s.tokens, t.q_pos) as usize {
            let at = kv.offset(layer, s.block as usize, t.kv_head, tok);
            let v = &kv.v[at..at + hd];
            for g in 0..group {
                axpy(scores[g * visible + n], v, &mut o[g * hd..(g + 1) * hd]);
            }
            n += 1;
        }
    }
    (o, lse)
}

/// Tokens of a segment at positions `<= q_pos`.
fn visible_tokens(first_pos: u32, tokens: u32, q_pos: u32) -> u32 {
    if first_pos > q_pos {
        0
    } else {
        tokens.min(q_pos - first_pos + 1)
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ac, ar) = a.split_at(a.len() / 8 * 8);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(8).zip(bc.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    let tail: f32 = ar.iter().zip(br).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y = alpha.mul_add(*x, *y);
    }
}
