//! MicroAttention on the CPU: paged, causal by position, GQA-aware, split over the KV length.
//!
//! Work is cut into tasks of (query row, KV head, a run of rBlocks). Each task reads its K and V
//! once for all the query heads of the group, and returns a partial (output, log-sum-exp) per head;
//! partials of one row and head are then merged exactly (`merge.rs`), which is what lets a long
//! context use every core even at batch 1.

use rayon::prelude::*;

use super::cpu::CpuKv;
use super::vector_math::{axpy, dot};
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
            merge_into(
                acc,
                &mut lse[t.row * shape.q_heads + h],
                &o[g * hd..(g + 1) * hd],
                l[g],
            );
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

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::backend::cpu::Cpu;
    use crate::backend::{Backend, KvSegment, KvShape};

    const BT: usize = 4;

    /// Attention of query rows at positions `first_pos..` over tokens `0..ctx` (causal), in f64,
    /// straight from the definition.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        q: &[f32],
        k: &[Vec<f32>],
        v: &[Vec<f32>],
        rows: usize,
        first_pos: usize,
        shape: AttnShape,
    ) -> (Vec<f64>, Vec<f64>) {
        let (hq, hd) = (shape.q_heads, shape.head_dim);
        let group = hq / shape.kv_heads;
        let mut out = vec![0.0; rows * hq * hd];
        let mut lse = vec![0.0; rows * hq];
        for r in 0..rows {
            let visible = first_pos + r + 1;
            for h in 0..hq {
                let kvh = h / group;
                let qh = &q[(r * hq + h) * hd..(r * hq + h + 1) * hd];
                let s: Vec<f64> = (0..visible)
                    .map(|t| {
                        let kt = &k[t][kvh * hd..(kvh + 1) * hd];
                        qh.iter()
                            .zip(kt)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            * shape.scale as f64
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let l: f64 = s.iter().map(|x| (x - m).exp()).sum();
                for (t, st) in s.iter().enumerate() {
                    let p = (st - m).exp() / l;
                    for d in 0..hd {
                        out[(r * hq + h) * hd + d] += p * v[t][kvh * hd + d] as f64;
                    }
                }
                lse[r * hq + h] = m + l.ln();
            }
        }
        (out, lse)
    }

    fn uniform(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    fn rel_err(a: &[f32], b: &[f64]) -> f64 {
        let num: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - y).powi(2)).sum();
        let den: f64 = b.iter().map(|y| y * y).sum();
        (num / den).sqrt()
    }

    /// Writes `ctx` tokens into a shuffled set of blocks and returns the segments in token order.
    fn fill(
        cpu: &Cpu,
        kv: &mut CpuKv,
        k: &[Vec<f32>],
        v: &[Vec<f32>],
        rng: &mut ChaCha8Rng,
    ) -> Vec<KvSegment> {
        let ctx = k.len();
        let mut ids: Vec<u32> = (0..kv.shape.blocks as u32).collect();
        for i in (1..ids.len()).rev() {
            ids.swap(i, rng.random_range(0..=i));
        }
        let width = k[0].len();
        let mut src = Vec::new();
        let mut slots = Vec::new();
        for t in 0..ctx {
            src.extend_from_slice(&k[t]);
            src.extend_from_slice(&v[t]);
            slots.push((ids[t / BT], (t % BT) as u32));
        }
        cpu.kv_write(kv, 0, &src, 2 * width, 0, width, &slots);
        (0..ctx.div_ceil(BT))
            .map(|b| KvSegment {
                block: ids[b],
                first_pos: (b * BT) as u32,
                tokens: (ctx - b * BT).min(BT) as u32,
            })
            .collect()
    }

    /// Decode and prefill chunks, split over 1 to 4 disjoint holders and merged, against the
    /// f64 definition: relative error under 1e-5 in f32.
    #[test]
    fn any_split_of_blocks_matches_monolithic_attention() {
        let cpu = Cpu::new();
        let mut rng = ChaCha8Rng::seed_from_u64(42);
        let shape = AttnShape {
            q_heads: 8,
            kv_heads: 2,
            head_dim: 16,
            scale: 0.25,
        };
        let kvw = shape.kv_heads * shape.head_dim;
        let qw = shape.q_heads * shape.head_dim;
        for trial in 0..24 {
            let ctx = rng.random_range(1..3 * SPLIT_TOKENS as usize);
            // Decode (one row) or a prefill chunk of the newest tokens.
            let rows = if trial % 2 == 0 {
                1
            } else {
                rng.random_range(1..=ctx.min(40))
            };
            let first_pos = ctx - rows;
            let k: Vec<Vec<f32>> = (0..ctx).map(|_| uniform(&mut rng, kvw)).collect();
            let v: Vec<Vec<f32>> = (0..ctx).map(|_| uniform(&mut rng, kvw)).collect();
            let q = uniform(&mut rng, rows * qw);
            let shape_kv = KvShape {
                layers: 1,
                blocks: ctx.div_ceil(BT) + 3,
                block_tokens: BT,
                kv_heads: shape.kv_heads,
                head_dim: shape.head_dim,
            };
            let mut kv = cpu.alloc_kv(shape_kv);
            let segments = fill(&cpu, &mut kv, &k, &v, &mut rng);
            let (want_o, want_lse) = reference(&q, &k, &v, rows, first_pos, shape);

            let holders = rng.random_range(1..=4usize).min(segments.len());
            let mut acc_o = vec![0.0f32; rows * qw];
            let mut acc_lse = vec![f32::NEG_INFINITY; rows * shape.q_heads];
            for hset in 0..holders {
                // Holder `hset` gets every block whose index is `hset` modulo `holders`.
                let mine: Vec<KvSegment> = segments
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| i % holders == hset)
                    .map(|(_, s)| *s)
                    .collect();
                let seqs = [AttnSeq {
                    rows: 0..rows,
                    first_row_pos: first_pos as u32,
                    segments: mine,
                }];
                let mut o = vec![f32::NAN; rows * qw];
                let mut l = vec![f32::NAN; rows * shape.q_heads];
                cpu.attention(&q, qw, 0, &kv, 0, shape, &seqs, &mut o, &mut l);
                for r in 0..rows * shape.q_heads {
                    let hd = shape.head_dim;
                    merge_into(
                        &mut acc_o[r * hd..(r + 1) * hd],
                        &mut acc_lse[r],
                        &o[r * hd..(r + 1) * hd],
                        l[r],
                    );
                }
            }
            let err = rel_err(&acc_o, &want_o);
            assert!(
                err < 1e-5,
                "trial {trial}: ctx {ctx}, rows {rows}, holders {holders}: error {err:e}"
            );
            let lse_err = rel_err(&acc_lse, &want_lse);
            assert!(lse_err < 1e-5, "trial {trial}: lse error {lse_err:e}");
        }
    }
}
