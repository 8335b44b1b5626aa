//! Every CUDA backend operation against a float64 reference, on fresh random inputs each run,
//! with outputs poisoned (NaN) before each call so an unwritten element fails.
//!
//! Errors are ||out - ref|| / ||ref||: under 1e-4 where the operands are f32, under 1e-2 where
//! the operation reads bf16 (weights, the KV cache). Needs a GPU: without one every test says so
//! and passes; `make test-gpu` runs them on the GPU machine.

use infinite_llm_worker::backend::cpu::Cpu;
use infinite_llm_worker::backend::cuda::{self, Cuda};
use infinite_llm_worker::backend::{AttnSeq, AttnShape, Backend, KvSegment, KvShape, NO_SLOT};
use infinite_llm_worker::sampling::{RowDraw, argmax, draw, kept_cut};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const F32_TOL: f64 = 1e-4;
const BF16_TOL: f64 = 1e-2;

fn gpu() -> Option<Cuda> {
    if !cuda::available() {
        eprintln!("SKIPPED: no CUDA GPU on this machine (run `make test-gpu` on one)");
        return None;
    }
    Some(Cuda::new(0).expect("the CUDA backend starts on a machine with a GPU"))
}

/// A generator seeded afresh each run; the seed is printed so a failure can be replayed.
fn rng(test: &str) -> StdRng {
    let seed = std::env::var("ILM_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("{test}: seed {seed} (ILM_TEST_SEED={seed} replays it)");
    StdRng::seed_from_u64(seed)
}

fn randn(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
        .collect()
}

/// Relative error over the finite references; where the reference is infinite (the -inf
/// log-sum-exp of a row that sees nothing) the output must be the same infinity.
fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if w.is_finite() {
            assert!(
                g.is_finite(),
                "element {i} is {g} (left unwritten?), expected {w}"
            );
        } else {
            assert_eq!(g as f64, w, "element {i}");
        }
    }
    let finite = || got.iter().zip(want).filter(|(_, w)| w.is_finite());
    let num: f64 = finite().map(|(&g, &w)| (g as f64 - w).powi(2)).sum();
    let den: f64 = finite().map(|(_, w)| w * w).sum();
    (num / den.max(1e-300)).sqrt()
}

fn poisoned(g: &Cuda, len: usize) -> <Cuda as Backend>::Buf {
    let mut b = g.alloc(len);
    g.upload(&vec![f32::NAN; len], &mut b);
    b
}

fn upload(g: &Cuda, data: &[f32]) -> <Cuda as Backend>::Buf {
    let mut b = g.alloc(data.len());
    g.upload(data, &mut b);
    b
}

fn check(name: &str, got: &[f32], want: &[f64], tol: f64) {
    let e = rel_err(got, want);
    eprintln!("{name}: relative error {e:.2e} (limit {tol:.0e})");
    assert!(e < tol, "{name}: relative error {e:e} over {tol:e}");
}

#[test]
fn projections_norms_and_elementwise_match_float64() {
    let Some(g) = gpu() else { return };
    let mut r = rng("projections_norms_and_elementwise_match_float64");
    // The norms move float4s for widths divisible by 4 up to 16K; 1030 and 16388 take the
    // scalar path.
    for (rows, k, n) in [
        (1, 256, 384),
        (7, 512, 96),
        (33, 1024, 1000),
        (3, 1030, 64),
        (2, 16388, 8),
    ] {
        let x = randn(&mut r, rows * k, 1.0);
        let w = randn(&mut r, n * k, 0.05);
        let bias = randn(&mut r, n, 0.5);
        let xd = upload(&g, &x);
        let wd = g.weight(n, k, w.clone());
        let bd = g.weight(1, n, bias.clone());
        let mut out = poisoned(&g, rows * n);
        g.linear(&xd, rows, &wd, Some(&bd), &mut out);
        let want: Vec<f64> = (0..rows * n)
            .map(|i| {
                let (row, j) = (i / n, i % n);
                bias[j] as f64
                    + (0..k)
                        .map(|c| x[row * k + c] as f64 * w[j * k + c] as f64)
                        .sum::<f64>()
            })
            .collect();
        check(
            &format!("linear {rows}x{k}->{n}"),
            &g.download(&out, rows * n),
            &want,
            BF16_TOL,
        );

        let nw = randn(&mut r, k, 1.0);
        let nwd = g.weight(1, k, nw.clone());
        let mut out = poisoned(&g, rows * k);
        g.rms_norm(&xd, rows, &nwd, 1e-5, &mut out);
        let want: Vec<f64> = (0..rows * k)
            .map(|i| {
                let row = &x[(i / k) * k..(i / k + 1) * k];
                let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / k as f64;
                x[i] as f64 / (ms + 1e-5).sqrt() * nw[i % k] as f64
            })
            .collect();
        check(
            &format!("rms_norm {rows}x{k}"),
            &g.download(&out, rows * k),
            &want,
            BF16_TOL,
        );

        let residual = randn(&mut r, rows * k, 1.0);
        let mut acc = upload(&g, &residual);
        let mut out = poisoned(&g, rows * k);
        g.add_rms_norm(&mut acc, &xd, rows, &nwd, 1e-5, &mut out);
        let summed: Vec<f64> = x
            .iter()
            .zip(&residual)
            .map(|(&a, &b)| a as f64 + b as f64)
            .collect();
        check(
            "add_rms_norm: the residual",
            &g.download(&acc, rows * k),
            &summed,
            F32_TOL,
        );
        let want: Vec<f64> = (0..rows * k)
            .map(|i| {
                let row = &summed[(i / k) * k..(i / k + 1) * k];
                let ms = row.iter().map(|v| v * v).sum::<f64>() / k as f64;
                summed[i] / (ms + 1e-5).sqrt() * nw[i % k] as f64
            })
            .collect();
        check(
            &format!("add_rms_norm {rows}x{k}"),
            &g.download(&out, rows * k),
            &want,
            BF16_TOL,
        );

        let y = randn(&mut r, rows * k, 1.0);
        let mut acc = upload(&g, &y);
        g.add_assign(&mut acc, &xd, rows * k);
        let want: Vec<f64> = x
            .iter()
            .zip(&y)
            .map(|(&a, &b)| a as f64 + b as f64)
            .collect();
        check("add_assign", &g.download(&acc, rows * k), &want, F32_TOL);

        let half = k / 2;
        let mut out = poisoned(&g, rows * half);
        g.silu_mul(&xd, rows, half, &mut out);
        let want: Vec<f64> = (0..rows * half)
            .map(|i| {
                let (row, c) = (i / half, i % half);
                let gate = x[row * k + c] as f64;
                gate / (1.0 + (-gate).exp()) * x[row * k + half + c] as f64
            })
            .collect();
        check("silu_mul", &g.download(&out, rows * half), &want, F32_TOL);

        let picks: Vec<usize> = (0..rows).rev().step_by(2).collect();
        let mut out = poisoned(&g, picks.len() * k);
        g.gather_rows(&xd, k, &picks, &mut out);
        let want: Vec<f64> = picks
            .iter()
            .flat_map(|&p| x[p * k..(p + 1) * k].iter().map(|&v| v as f64))
            .collect();
        check(
            "gather_rows",
            &g.download(&out, picks.len() * k),
            &want,
            F32_TOL,
        );
    }
}

#[test]
fn embedding_and_rope_match_float64() {
    let Some(g) = gpu() else { return };
    let mut r = rng("embedding_and_rope_match_float64");
    let (vocab, width) = (500, 192);
    let table = randn(&mut r, vocab * width, 1.0);
    let td = g.weight(vocab, width, table.clone());
    let ids: Vec<u32> = (0..13).map(|_| r.random_range(0..vocab as u32)).collect();
    let mut out = poisoned(&g, ids.len() * width);
    g.embed(&td, &ids, &mut out);
    let want: Vec<f64> = ids
        .iter()
        .flat_map(|&i| table[i as usize * width..(i as usize + 1) * width].iter())
        .map(|&v| v as f64)
        .collect();
    check(
        "embed",
        &g.download(&out, ids.len() * width),
        &want,
        BF16_TOL,
    );

    let (rows, heads, hd, extra) = (9, 6, 64, 40);
    let row_width = heads * hd + extra;
    let x = randn(&mut r, rows * row_width, 1.0);
    let positions: Vec<u32> = (0..rows).map(|_| r.random_range(0..100_000)).collect();
    let inv_freq: Vec<f32> = (0..hd / 2)
        .map(|j| 500_000f32.powf(-2.0 * j as f32 / hd as f32))
        .collect();
    let mut xd = upload(&g, &x);
    g.rope(&mut xd, row_width, heads, hd, &positions, &inv_freq);
    let mut want: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    for (row, &p) in positions.iter().enumerate() {
        for h in 0..heads {
            let base = row * row_width + h * hd;
            for j in 0..hd / 2 {
                // The kernel takes the angle in f32, as the CPU backend and transformers do.
                let angle = (p as f32 * inv_freq[j]) as f64;
                let (s, c) = angle.sin_cos();
                let (a, b) = (x[base + j] as f64, x[base + j + hd / 2] as f64);
                want[base + j] = a * c - b * s;
                want[base + j + hd / 2] = b * c + a * s;
            }
        }
    }
    check(
        "rope (columns past the heads untouched)",
        &g.download(&xd, rows * row_width),
        &want,
        F32_TOL,
    );
}

/// A request of the attention test: its query rows, their first position, and, when some of
/// its blocks are held by a creditor (left out of the call), every how many blocks one is.
struct Req {
    first_row_pos: u32,
    rows: usize,
    remote_every: Option<usize>,
}

impl Req {
    fn local(first_row_pos: u32, rows: usize) -> Self {
        Req {
            first_row_pos,
            rows,
            remote_every: None,
        }
    }
}

/// float64 attention over the KV each row sees (positions up to its own, among the tokens
/// `held` here), with the softmax's log-sum-exp; K and V are given per request as
/// `[token][kv_head][dim]`.  A row that sees nothing gets 0 and -inf.
#[allow(clippy::too_many_arguments)]
fn attention_f64(
    q: &[f32],
    q_width: usize,
    row: usize,
    pos: u32,
    k: &[f32],
    v: &[f32],
    shape: AttnShape,
    held: &dyn Fn(usize) -> bool,
    out: &mut [f64],
    lse: &mut [f64],
) {
    let (hq, hkv, hd) = (shape.q_heads, shape.kv_heads, shape.head_dim);
    let group = hq / hkv;
    let seen: Vec<usize> = (0..=pos as usize).filter(|&t| held(t)).collect();
    for h in 0..hq {
        let kh = h / group;
        let qv = &q[row * q_width + h * hd..row * q_width + (h + 1) * hd];
        if seen.is_empty() {
            out[(row * hq + h) * hd..(row * hq + h + 1) * hd].fill(0.0);
            lse[row * hq + h] = f64::NEG_INFINITY;
            continue;
        }
        let scores: Vec<f64> = seen
            .iter()
            .map(|&t| {
                let kt = &k[(t * hkv + kh) * hd..(t * hkv + kh + 1) * hd];
                qv.iter()
                    .zip(kt)
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum::<f64>()
                    * shape.scale as f64
            })
            .collect();
        let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let l: f64 = scores.iter().map(|s| (s - m).exp()).sum();
        for d in 0..hd {
            out[(row * hq + h) * hd + d] = scores
                .iter()
                .zip(&seen)
                .map(|(s, &t)| (s - m).exp() / l * v[(t * hkv + kh) * hd + d] as f64)
                .sum();
        }
        lse[row * hq + h] = m + l.ln();
    }
}

/// Writes each request's K/V through `kv_write` into shuffled blocks, then runs one attention
/// call for all requests' query rows (decode rows and causal prefill chunks together).
fn attention_case(g: &Cuda, r: &mut StdRng, shape: AttnShape, bt: usize, reqs: &[Req]) {
    let (hq, hkv, hd) = (shape.q_heads, shape.kv_heads, shape.head_dim);
    let kv_width = hkv * hd;
    let blocks_needed: usize = reqs
        .iter()
        .map(|q| (q.first_row_pos as usize + q.rows).div_ceil(bt))
        .sum();
    let kv_shape = KvShape {
        layers: 2,
        blocks: blocks_needed + 3,
        block_tokens: bt,
        kv_heads: hkv,
        head_dim: hd,
    };
    let mut kv = g.alloc_kv(kv_shape);
    let mut free: Vec<u32> = (0..kv_shape.blocks as u32).collect();
    for i in (1..free.len()).rev() {
        free.swap(i, r.random_range(0..=i));
    }
    let layer = 1;
    let total_rows: usize = reqs.iter().map(|q| q.rows).sum();
    let q_width = hq * hd + 16;
    let q = randn(r, total_rows * q_width, 1.0);
    let mut seqs = Vec::new();
    let mut want_o = vec![0.0; total_rows * hq * hd];
    let mut want_l = vec![0.0; total_rows * hq];
    let mut row0 = 0;
    for req in reqs {
        let tokens = req.first_row_pos as usize + req.rows;
        let k = randn(r, tokens * kv_width, 1.0);
        let v = randn(r, tokens * kv_width, 1.0);
        let blocks: Vec<u32> = (0..tokens.div_ceil(bt))
            .map(|_| free.pop().unwrap())
            .collect();
        // The cache is written in one call per request, rows [k | v], one slot each.
        let src: Vec<f32> = (0..tokens)
            .flat_map(|t| {
                k[t * kv_width..(t + 1) * kv_width]
                    .iter()
                    .chain(&v[t * kv_width..(t + 1) * kv_width])
                    .copied()
                    .collect::<Vec<_>>()
            })
            .collect();
        let slots: Vec<(u32, u32)> = (0..tokens)
            .map(|t| (blocks[t / bt], (t % bt) as u32))
            .collect();
        g.kv_write(
            &mut kv,
            layer,
            &upload(g, &src),
            2 * kv_width,
            0,
            kv_width,
            &slots,
        );
        let remote = |block: usize| req.remote_every.is_some_and(|n| block % n == n - 1);
        let segments = blocks
            .iter()
            .enumerate()
            .filter(|&(i, _)| !remote(i))
            .map(|(i, &b)| KvSegment {
                block: b,
                first_pos: (i * bt) as u32,
                tokens: (tokens - i * bt).min(bt) as u32,
            })
            .collect();
        seqs.push(AttnSeq {
            rows: row0..row0 + req.rows,
            first_row_pos: req.first_row_pos,
            segments,
        });
        for i in 0..req.rows {
            attention_f64(
                &q,
                q_width,
                row0 + i,
                req.first_row_pos + i as u32,
                &k,
                &v,
                shape,
                &|t| !remote(t / bt),
                &mut want_o,
                &mut want_l,
            );
        }
        row0 += req.rows;
    }
    // A slot at NO_SLOT is skipped: writing it must not disturb the cache.
    g.kv_write(
        &mut kv,
        layer,
        &upload(g, &vec![f32::NAN; 2 * kv_width]),
        2 * kv_width,
        0,
        kv_width,
        &[NO_SLOT],
    );
    let qd = upload(g, &q);
    let mut out = poisoned(g, total_rows * hq * hd);
    let mut lse = poisoned(g, total_rows * hq);
    g.attention(
        &qd, q_width, 0, &kv, layer, shape, &seqs, &mut out, &mut lse,
    );
    let name = format!(
        "attention hq {hq} hkv {hkv} hd {hd} bt {bt} rows {total_rows} contexts {:?}",
        reqs.iter()
            .map(|q| q.first_row_pos as usize + q.rows)
            .collect::<Vec<_>>()
    );
    check(
        &format!("{name}: output"),
        &g.download(&out, total_rows * hq * hd),
        &want_o,
        BF16_TOL,
    );
    check(
        &format!("{name}: log-sum-exp"),
        &g.download(&lse, total_rows * hq),
        &want_l,
        BF16_TOL,
    );
}

#[test]
fn paged_attention_matches_float64() {
    let Some(g) = gpu() else { return };
    let mut r = rng("paged_attention_matches_float64");
    for (hq, hkv, hd) in [(8, 2, 32), (32, 8, 128), (4, 4, 64), (16, 2, 256)] {
        let shape = AttnShape {
            q_heads: hq,
            kv_heads: hkv,
            head_dim: hd,
            scale: 1.0 / (hd as f32).sqrt(),
        };
        // 16 and 64 tokens a block use the prefill kernel's tiles of 64 token slots; 128
        // exceeds a tile, so prompt chunks take the split kernel too.
        for bt in [16, 64, 128] {
            let decode_ctx = r.random_range(1..3000);
            let reqs = [
                // Decode rows, one long enough to be split over many blocks of the grid.
                Req::local(decode_ctx, 1),
                Req::local(0, 1),
                // Prompt chunks: a short one (the split kernel), one in the middle of a
                // request, one from the start, and one part of whose blocks a creditor holds.
                Req::local(r.random_range(0..200), r.random_range(2..8)),
                Req::local(r.random_range(0..700), r.random_range(8..300)),
                Req::local(0, r.random_range(100..400)),
                Req {
                    first_row_pos: r.random_range(100..600),
                    rows: r.random_range(8..200),
                    remote_every: Some(3),
                },
                // Every block at a creditor: its rows see nothing here.
                Req {
                    first_row_pos: 0,
                    rows: 20,
                    remote_every: Some(1),
                },
                Req::local(7, 1),
            ];
            attention_case(&g, &mut r, shape, bt, &reqs);
        }
    }
}

#[test]
fn greedy_rows_take_the_host_argmax() {
    let Some(g) = gpu() else { return };
    let mut r = rng("greedy_rows_take_the_host_argmax");
    for (rows, width) in [(1, 128256), (5, 32000), (33, 1000)] {
        let mut x = randn(&mut r, rows * width, 10.0);
        // A tie on the maximum in row 0 (the lower index must win) and a row of -inf last.
        let (a, b) = (
            r.random_range(0..width / 2),
            r.random_range(width / 2..width),
        );
        x[a] = 100.0;
        x[b] = 100.0;
        if rows > 1 {
            x[(rows - 1) * width..].fill(f32::NEG_INFINITY);
        }
        let got = g.sample_rows(&upload(&g, &x), rows, width, &vec![RowDraw::greedy(); rows]);
        let want: Vec<u32> = x.chunks(width).map(argmax).collect();
        assert_eq!(got, want, "{rows} rows of {width}");
        assert_eq!(got[0], a as u32, "a tie goes to the lowest index");
    }
}

/// Draws of every kind over `rows` rows of `width` random logits, with ties at the top (row 5
/// cuts at 3 of 8) and a row half masked to -inf.
fn sampling_case(r: &mut StdRng, rows: usize, width: usize) -> (Vec<f32>, Vec<RowDraw>) {
    // (temperature, top_k, top_p); top_k past the width means no cut.
    let configs = [
        (1.0, 0, 1.0),
        (0.7, 50, 1.0),
        (1.3, 0, 0.9),
        (0.5, 20, 0.5),
        (1.0, 1_000_000, 0.95),
        (2.0, 3, 0.99),
        (1.0, 1, 1.0),
        (0.0, 0, 1.0),
    ];
    let mut x = randn(r, rows * width, 3.0);
    x[..8].fill(5.0);
    x[5 * width..5 * width + 8].fill(5.0);
    x[width..width + width / 2].fill(f32::NEG_INFINITY);
    let draws = (0..rows)
        .map(|i| {
            let (temperature, top_k, top_p) = configs[i % configs.len()];
            RowDraw {
                temperature,
                top_k,
                top_p,
                u: r.random::<f32>(),
            }
        })
        .collect();
    (x, draws)
}

/// Sampling on the GPU follows the host's rule (worker/src/sampling.rs): over a small
/// vocabulary the same draw picks the same token, for temperature, top-k, top-p and their
/// mixes. The sums run in another order there, so a draw within rounding of a boundary may
/// pick the neighbour: at most 1% of the rows may differ.
#[test]
fn sampled_rows_pick_what_the_host_picks() {
    let Some(g) = gpu() else { return };
    let mut r = rng("sampled_rows_pick_what_the_host_picks");
    let (rows, width) = (1024, 256);
    let (x, draws) = sampling_case(&mut r, rows, width);
    let got = g.sample_rows(&upload(&g, &x), rows, width, &draws);
    let differ: Vec<_> = x
        .chunks(width)
        .zip(&draws)
        .zip(&got)
        .filter(|((row, d), t)| draw(row, d) != **t)
        .map(|((_, d), t)| (*d, *t))
        .collect();
    eprintln!(
        "sampling over {width} tokens: {} of {rows} rows differ from the host",
        differ.len()
    );
    assert!(differ.len() * 100 <= rows, "{differ:?}");
}

/// Over real vocabulary sizes every pick stays inside the top-k and top-p cuts (the cut taken
/// a hair looser, for rounding), and greedy rows take the host's argmax.
#[test]
fn sampled_rows_stay_inside_the_cuts() {
    let Some(g) = gpu() else { return };
    let mut r = rng("sampled_rows_stay_inside_the_cuts");
    for (rows, width) in [(33, 32000), (16, 128256)] {
        let (x, draws) = sampling_case(&mut r, rows, width);
        let got = g.sample_rows(&upload(&g, &x), rows, width, &draws);
        for (i, ((row, d), &t)) in x.chunks(width).zip(&draws).zip(&got).enumerate() {
            let picked = row[t as usize];
            if d.temperature == 0.0 || d.top_k == 1 {
                assert_eq!(t, argmax(row), "row {i}: greedy");
                continue;
            }
            let loose = RowDraw {
                top_p: (d.top_p + 0.01).min(1.0),
                ..*d
            };
            assert!(
                picked.is_finite() && picked >= kept_cut(row, &loose),
                "row {i} of {width}: {d:?} picked {t} (logit {picked}), cut {}",
                kept_cut(row, d)
            );
        }
    }
}

#[test]
fn attention_rows_outside_every_sequence_are_empty() {
    let Some(g) = gpu() else { return };
    let shape = AttnShape {
        q_heads: 4,
        kv_heads: 2,
        head_dim: 64,
        scale: 0.125,
    };
    let kv = g.alloc_kv(KvShape {
        layers: 1,
        blocks: 2,
        block_tokens: 16,
        kv_heads: 2,
        head_dim: 64,
    });
    let q = upload(&g, &vec![1.0; 3 * 4 * 64]);
    let seqs = [AttnSeq {
        rows: 2..3,
        first_row_pos: 0,
        segments: vec![],
    }];
    let mut out = poisoned(&g, 3 * 4 * 64);
    let mut lse = poisoned(&g, 3 * 4);
    g.attention(&q, 4 * 64, 0, &kv, 0, shape, &seqs, &mut out, &mut lse);
    assert!(g.download(&out, 3 * 4 * 64).iter().all(|&x| x == 0.0));
    assert!(
        g.download(&lse, 3 * 4)
            .iter()
            .all(|&x| x == f32::NEG_INFINITY)
    );
}

#[test]
fn a_kv_block_read_back_is_what_was_written_in_the_cpu_layout() {
    let Some(g) = gpu() else { return };
    let mut r = rng("kv_block");
    let shape = KvShape {
        layers: 3,
        blocks: 5,
        block_tokens: 16,
        kv_heads: 2,
        head_dim: 64,
    };
    let cpu = Cpu::new();
    let (mut gk, mut ck) = (g.alloc_kv(shape), cpu.alloc_kv(shape));
    // Values a bf16 cache holds exactly: a migrated block arrives bit for bit.
    let n = 2 * shape.layers * shape.block_floats();
    let data: Vec<f32> = randn(&mut r, n, 2.0)
        .into_iter()
        .map(|x| half::bf16::from_f32(x).to_f32())
        .collect();
    g.kv_write_block(&mut gk, 3, &data);
    assert_eq!(g.kv_read_block(&gk, 3), data);
    assert!(
        g.kv_read_block(&gk, 2).iter().all(|&x| x == 0.0),
        "the neighbouring block is untouched"
    );
    // Rows written through `kv_write` read back as the CPU backend lays them out.
    let width = 2 * shape.kv_heads * shape.head_dim;
    let rows = randn(&mut r, shape.block_tokens * width, 1.0);
    let slots: Vec<(u32, u32)> = (0..shape.block_tokens as u32).map(|t| (4, t)).collect();
    let half_width = shape.kv_heads * shape.head_dim;
    for layer in 0..shape.layers {
        g.kv_write(
            &mut gk,
            layer,
            &upload(&g, &rows),
            width,
            0,
            half_width,
            &slots,
        );
        cpu.kv_write(&mut ck, layer, &rows, width, 0, half_width, &slots);
    }
    let want: Vec<f64> = cpu
        .kv_read_block(&ck, 4)
        .into_iter()
        .map(f64::from)
        .collect();
    check("kv_read_block", &g.kv_read_block(&gk, 4), &want, BF16_TOL);
}
