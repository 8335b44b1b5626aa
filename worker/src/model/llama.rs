//! The Llama-family decoder (Llama 2/3, Mistral, Qwen2) over any backend.
//!
//! One forward pass takes a flat batch of token rows from many requests (prefill chunks and
//! decode tokens alike), writes their K and V into the paged cache and returns logits for the
//! rows that need a next token.

use std::path::Path;

use crate::backend::{AttnSeq, AttnShape, Backend, DeviceLink, KvShape, ReplayKey};
use crate::dist_attention::{self, AttnCall, PartOut, QkvLayout, RemotePart};
use crate::model::config::ModelConfig;
use crate::model::weights::{Weights, WeightsError};
use crate::sampling::RowDraw;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Config(#[from] crate::model::config::ConfigError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("tensor {name} has shape {got:?}, expected {want:?}")]
    Shape {
        name: String,
        got: Vec<usize>,
        want: Vec<usize>,
    },
}

/// Most rows whose logits one lm_head GEMM produces.
const MAX_LOGIT_ROWS: usize = 64;

struct Layer<B: Backend> {
    input_norm: B::Weight,
    /// q, k and v projections stacked into one `[q + 2 kv, hidden]` matrix: one GEMM, not three.
    qkv: B::Weight,
    qkv_bias: Option<B::Weight>,
    o: B::Weight,
    post_norm: B::Weight,
    /// gate and up stacked into one `[2 intermediate, hidden]` matrix.
    gate_up: B::Weight,
    down: B::Weight,
}

/// Per-step activations, grown to the largest step seen and then reused.
struct Scratch<B: Backend> {
    rows: usize,
    x: B::Buf,
    h: B::Buf,
    qkv: B::Buf,
    attn: B::Buf,
    lse: B::Buf,
    proj: B::Buf,
    gate_up: B::Buf,
    act: B::Buf,
    logits: B::Buf,
}

/// One step's inputs. `slots[r]` is where row `r`'s K and V go.
pub struct StepInput<'a> {
    pub tokens: &'a [u32],
    pub positions: &'a [u32],
    pub slots: &'a [(u32, u32)],
    pub seqs: &'a [AttnSeq],
    /// Rows whose logits are wanted, in the order they are returned.
    pub logit_rows: &'a [usize],
    /// Attention over blocks that creditors hold.
    pub remote: &'a [RemotePart],
}

/// Answers a home with a creditor's partial results (none when they went over the link), or
/// with why there are none.
pub type Reply = Box<dyn FnOnce(Result<Vec<PartOut>, String>) + Send>;

/// What happened while a home waited for its creditors.
pub enum Waited {
    /// Every creditor answered: per peer, one result per part, in the order sent.
    Done(Vec<(u16, Vec<PartOut>)>),
    /// Another home asks this worker, as a creditor, for MicroAttention meanwhile (over the
    /// direct link given, if the call is linked); serving it while waiting is what keeps two
    /// homes that borrow from each other from deadlocking.
    Serve(AttnCall, Option<DeviceLink>, Reply),
    Failed(String),
}

/// The network side of DistAttention, seen from the model's layer loop.
pub trait Exchange {
    fn send(&mut self, calls: Vec<(u16, AttnCall)>);
    fn wait(&mut self) -> Waited;
    /// The direct device link to a creditor, when one is up.
    fn link(&mut self, _peer: u16) -> Option<DeviceLink> {
        None
    }
    /// A creditor's link failed: it is as good as lost.
    fn link_failed(&mut self, _peer: u16, _why: &str) {}
    /// An attention call of another home that arrived meanwhile, answered between layers so
    /// that its step does not wait for the whole of this one (`Done` once none is waiting).
    fn poll(&mut self) -> Waited {
        Waited::Done(Vec::new())
    }
    /// Waits for every creditor's answer and for `done` (the device's side of a step queued
    /// whole), within the peer timeout. Without peers to serve, it only looks at `done` until it holds.
    fn settle(&mut self, done: &mut dyn FnMut() -> Result<bool, String>) -> Waited {
        loop {
            match done() {
                Ok(true) => return Waited::Done(Vec::new()),
                Ok(false) => std::thread::yield_now(),
                Err(e) => return Waited::Failed(e),
            }
        }
    }
}

/// Waits through `wait` for what it waits for, serving the other homes' calls that come
/// meanwhile: a linked call is queued whole, an inline one answered.
fn serving<B: Backend>(
    b: &B,
    kv: &mut B::Kv,
    shape: AttnShape,
    layers: usize,
    mut wait: impl FnMut() -> Waited,
) -> Result<Vec<(u16, Vec<PartOut>)>, String> {
    loop {
        match wait() {
            Waited::Done(replies) => return Ok(replies),
            Waited::Serve(call, link, reply) => reply(dist_attention::answer(
                b,
                kv,
                shape,
                layers,
                &call,
                link.as_ref(),
            )),
            Waited::Failed(e) => return Err(e),
        }
    }
}

/// For steps without remote blocks, and for workers on their own.
pub struct NoExchange;

impl Exchange for NoExchange {
    fn send(&mut self, calls: Vec<(u16, AttnCall)>) {
        assert!(calls.is_empty(), "no peers to send to");
    }

    fn wait(&mut self) -> Waited {
        Waited::Done(Vec::new())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("remote attention failed: {0}")]
pub struct RemoteError(pub String);

pub struct Llama<B: Backend> {
    backend: B,
    config: ModelConfig,
    embed: B::Weight,
    layers: Vec<Layer<B>>,
    norm: B::Weight,
    /// `None` when tied to the embedding.
    lm_head: Option<B::Weight>,
    inv_freq: Vec<f32>,
    scratch: Option<Scratch<B>>,
}

impl<B: Backend> Llama<B> {
    pub fn load(dir: &Path, backend: B) -> Result<Self, ModelError> {
        let config = ModelConfig::from_model_dir(dir)?;
        let weights = Weights::open(dir)?;
        let c = &config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let (qd, kvd) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
        let get = |name: &str, want: &[usize]| -> Result<Vec<f32>, ModelError> {
            let t = weights.get_f32(name)?;
            if t.shape != want {
                return Err(ModelError::Shape {
                    name: name.to_string(),
                    got: t.shape,
                    want: want.to_vec(),
                });
            }
            Ok(t.data)
        };
        // Stacks tensors row-wise; `cols == None` stacks vectors (biases) into one row.
        let stacked =
            |names: &[(String, usize)], cols: Option<usize>| -> Result<B::Weight, ModelError> {
                let rows: usize = names.iter().map(|(_, r)| r).sum();
                let mut data = Vec::with_capacity(rows * cols.unwrap_or(1));
                for (name, r) in names {
                    let want: Vec<usize> = cols.map_or(vec![*r], |c| vec![*r, c]);
                    data.extend(get(name, &want)?);
                }
                Ok(match cols {
                    Some(c) => backend.weight(rows, c, data),
                    None => backend.weight(1, rows, data),
                })
            };
        let vector = |name: &str, n: usize| -> Result<B::Weight, ModelError> {
            Ok(backend.weight(1, n, get(name, &[n])?))
        };
        let matrix = |name: &str, rows: usize, cols: usize| -> Result<B::Weight, ModelError> {
            Ok(backend.weight(rows, cols, get(name, &[rows, cols])?))
        };

        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let qkv_names = [
                (format!("{p}.self_attn.q_proj"), qd),
                (format!("{p}.self_attn.k_proj"), kvd),
                (format!("{p}.self_attn.v_proj"), kvd),
            ];
            let with = |suffix: &str| -> Vec<(String, usize)> {
                qkv_names
                    .iter()
                    .map(|(n, r)| (format!("{n}.{suffix}"), *r))
                    .collect()
            };
            let qkv_bias = if c.attention_bias {
                Some(stacked(&with("bias"), None)?)
            } else {
                None
            };
            let im = c.intermediate_size;
            layers.push(Layer {
                input_norm: vector(&format!("{p}.input_layernorm.weight"), h)?,
                qkv: stacked(&with("weight"), Some(h))?,
                qkv_bias,
                o: matrix(&format!("{p}.self_attn.o_proj.weight"), h, qd)?,
                post_norm: vector(&format!("{p}.post_attention_layernorm.weight"), h)?,
                gate_up: stacked(
                    &[
                        (format!("{p}.mlp.gate_proj.weight"), im),
                        (format!("{p}.mlp.up_proj.weight"), im),
                    ],
                    Some(h),
                )?,
                down: matrix(&format!("{p}.mlp.down_proj.weight"), h, im)?,
            });
        }
        let embed = matrix("model.embed_tokens.weight", c.vocab_size, h)?;
        // Some tied checkpoints still ship lm_head; the embedding is the source of truth then.
        let lm_head = if c.tie_word_embeddings || !weights.contains("lm_head.weight") {
            None
        } else {
            Some(matrix("lm_head.weight", c.vocab_size, h)?)
        };
        let norm = vector("model.norm.weight", h)?;
        let inv_freq = config.rope_inv_freq();
        Ok(Self {
            backend,
            config,
            embed,
            layers,
            norm,
            lm_head,
            inv_freq,
            scratch: None,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Geometry of a KV cache of `blocks` rBlocks of `block_tokens` tokens for this model.
    pub fn kv_shape(&self, blocks: usize, block_tokens: usize) -> KvShape {
        KvShape {
            layers: self.config.num_hidden_layers,
            blocks,
            block_tokens,
            kv_heads: self.config.num_key_value_heads,
            head_dim: self.config.head_dim,
        }
    }

    fn attn_shape(&self) -> AttnShape {
        let c = &self.config;
        AttnShape {
            q_heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            scale: 1.0 / (c.head_dim as f32).sqrt(),
        }
    }

    fn ensure_scratch(&mut self, rows: usize) {
        if self.scratch.as_ref().is_some_and(|s| s.rows >= rows) {
            return;
        }
        let c = &self.config;
        let b = &self.backend;
        // Recorded step parts point at the buffers about to be replaced.
        b.forget_replays();
        let (h, hd) = (c.hidden_size, c.head_dim);
        let qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * hd;
        self.scratch = Some(Scratch {
            rows,
            x: b.alloc(rows * h),
            h: b.alloc(rows * h),
            qkv: b.alloc(rows * qkv),
            attn: b.alloc(rows * c.num_attention_heads * hd),
            lse: b.alloc(rows * c.num_attention_heads),
            proj: b.alloc(rows * h),
            gate_up: b.alloc(rows * 2 * c.intermediate_size),
            act: b.alloc(rows * c.intermediate_size),
            // Only the rows that sample need logits; at most one per request in the step.
            logits: b.alloc(rows.min(MAX_LOGIT_ROWS) * c.vocab_size),
        });
    }

    /// Serves another home's MicroAttention over blocks this worker lent.
    /// A linked call needs the link to its home; without one it is refused.
    pub fn serve_attention(
        &self,
        kv: &mut B::Kv,
        call: &AttnCall,
        link: Option<&DeviceLink>,
    ) -> Result<Vec<PartOut>, String> {
        dist_attention::answer(
            &self.backend,
            kv,
            self.attn_shape(),
            self.layers.len(),
            call,
            link,
        )
    }

    /// Runs one step and returns `[logit_rows.len(), vocab]` logits.
    pub fn forward(
        &mut self,
        kv: &mut B::Kv,
        input: &StepInput,
        exchange: &mut dyn Exchange,
    ) -> Result<Vec<f32>, RemoteError> {
        self.layers_and_head(kv, input, exchange, |b, logits, m, vocab| {
            b.download(logits, m * vocab)
        })
    }

    /// Runs one step and returns the token each of `logit_rows` gives under its draw, chosen
    /// where the logits are (on a GPU only the token ids come back).
    pub fn forward_sampled(
        &mut self,
        kv: &mut B::Kv,
        input: &StepInput,
        draws: &[RowDraw],
        exchange: &mut dyn Exchange,
    ) -> Result<Vec<u32>, RemoteError> {
        self.layers_and_head(kv, input, exchange, |b, logits, m, vocab| {
            b.sample_rows(logits, m, vocab, draws)
        })
    }

    /// The decoder over the step's rows, then the LM head over `logit_rows` in chunks, each
    /// chunk's `[rows, vocab]` logits handed to `take`.
    fn layers_and_head<T>(
        &mut self,
        kv: &mut B::Kv,
        input: &StepInput,
        exchange: &mut dyn Exchange,
        take: impl Fn(&B, &B::Buf, usize, usize) -> Vec<T>,
    ) -> Result<Vec<T>, RemoteError> {
        let rows = input.tokens.len();
        assert_eq!(rows, input.positions.len());
        assert_eq!(rows, input.slots.len());
        self.ensure_scratch(rows);
        let shape = self.attn_shape();
        let Self {
            backend: b,
            config: c,
            embed,
            layers,
            norm,
            lm_head,
            inv_freq,
            scratch,
        } = self;
        let s = scratch.as_mut().expect("scratch allocated above");
        let (h, hd) = (c.hidden_size, c.head_dim);
        let (qd, kvd) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
        let qkv_w = qd + 2 * kvd;
        let eps = c.rms_norm_eps as f32;

        b.embed(embed, input.tokens, &mut s.x);
        b.stage_step(kv, input.positions, input.slots, inv_freq);
        // A step whose creditors all have a direct link sends them one call, and then each
        // layer's rows device to device; otherwise every creditor gets each layer's rows over
        // the peer connection, from the host. (A step queued whole on the device never waits
        // on a host download that a stuck link could hang.)
        let links: Vec<(u16, DeviceLink, Vec<usize>)> =
            dist_attention::linked_rows(input.seqs, input.remote)
                .into_iter()
                .map(|(peer, rows)| Some((peer, exchange.link(peer)?, rows)))
                .collect::<Option<_>>()
                .unwrap_or_default();
        let linked = !links.is_empty();
        let inline = !input.remote.is_empty() && !linked;
        let link_refs: Vec<(&DeviceLink, &[usize])> =
            links.iter().map(|(_, l, r)| (l, &r[..])).collect();
        let layout = QkvLayout {
            width: qkv_w,
            q: qd,
            kv: kvd,
        };
        let fail_links = |exchange: &mut dyn Exchange, e: &str| {
            for (peer, ..) in &links {
                exchange.link_failed(*peer, e);
            }
            RemoteError(e.to_owned())
        };
        if linked {
            exchange.send(
                dist_attention::build_calls(0, None, layout, input.seqs, input.remote)
                    .into_iter()
                    .collect(),
            );
        }
        // Everything from one layer's attention output to the next layer's stored K/V is
        // device work that only depends on the step's shape: one replayable part per layer
        // (part L closes the last layer). Attention and the peer exchange stay outside.
        let mlp_and_norm = |s: &mut Scratch<B>, l: &Layer<B>, next: Option<&Layer<B>>| {
            b.linear(&s.attn, rows, &l.o, None, &mut s.proj);
            b.add_rms_norm(&mut s.x, &s.proj, rows, &l.post_norm, eps, &mut s.h);
            b.linear(&s.h, rows, &l.gate_up, None, &mut s.gate_up);
            b.silu_mul(&s.gate_up, rows, c.intermediate_size, &mut s.act);
            b.linear(&s.act, rows, &l.down, None, &mut s.proj);
            // The residual add meets the next layer's input norm in one pass.
            match next {
                Some(next) => {
                    b.add_rms_norm(&mut s.x, &s.proj, rows, &next.input_norm, eps, &mut s.h)
                }
                None => b.add_assign(&mut s.x, &s.proj, rows * h),
            }
        };
        for (li, l) in layers.iter().enumerate() {
            b.replay(ReplayKey { part: li, rows }, &mut || {
                match li.checked_sub(1) {
                    Some(prev) => mlp_and_norm(s, &layers[prev], Some(l)),
                    None => b.rms_norm(&s.x, rows, &l.input_norm, eps, &mut s.h),
                }
                b.linear(&s.h, rows, &l.qkv, l.qkv_bias.as_ref(), &mut s.qkv);
                // q and k are rotated in place inside the stacked buffer (k's heads follow q's).
                b.rope(
                    &mut s.qkv,
                    qkv_w,
                    c.num_attention_heads + c.num_key_value_heads,
                    hd,
                    input.positions,
                    inv_freq,
                );
                b.kv_write(kv, li, &s.qkv, qkv_w, qd, qd + kvd, input.slots);
            });
            if inline {
                let host = b.download(&s.qkv, rows * qkv_w);
                exchange.send(
                    dist_attention::build_calls(li, Some(&host), layout, input.seqs, input.remote)
                        .into_iter()
                        .collect(),
                );
            }
            if linked {
                let sent = b.link_call(&s.qkv, qkv_w, &link_refs, qd, c.num_attention_heads);
                if let Err(e) = sent {
                    return Err(fail_links(exchange, &e.to_string()));
                }
            }
            // Local MicroAttention runs while the creditors work on theirs.
            b.attention(
                &s.qkv,
                qkv_w,
                0,
                kv,
                li,
                shape,
                input.seqs,
                &mut s.attn,
                &mut s.lse,
            );
            if linked {
                let (h, hd) = (c.num_attention_heads, shape.head_dim);
                if let Err(e) = b.link_merge(&link_refs, &mut s.attn, &mut s.lse, h, hd) {
                    return Err(fail_links(exchange, &e.to_string()));
                }
            }
            // Homes that borrowed here wait on these answers layer by layer: served between
            // layers, not after the step (a step queued whole on the device is not paused).
            if !linked {
                serving(b, kv, shape, layers.len(), || exchange.poll()).map_err(RemoteError)?;
            }
            if inline {
                let replies =
                    serving(b, kv, shape, layers.len(), || exchange.wait()).map_err(RemoteError)?;
                let mut o = b.download(&s.attn, rows * qd);
                let mut l = b.download(&s.lse, rows * c.num_attention_heads);
                for (peer, results) in replies {
                    let parts: Vec<&RemotePart> =
                        input.remote.iter().filter(|p| p.peer == peer).collect();
                    let merged = dist_attention::merge_call(
                        &mut o, &mut l, shape, input.seqs, &parts, &results,
                    );
                    if let Err(e) = merged {
                        // The creditor is as good as lost: its requests recompute.
                        exchange.link_failed(peer, &e);
                        return Err(RemoteError(e));
                    }
                }
                b.upload(&o, &mut s.attn);
            }
        }
        if let Some(last) = layers.last() {
            let part = layers.len();
            b.replay(ReplayKey { part, rows }, &mut || {
                mlp_and_norm(s, last, None)
            });
        }
        let n = input.logit_rows.len();
        // The step is queued whole; the host waits for its links (serving other homes
        // meanwhile) before anything can block on the device: once the first logits are
        // queued too, or at once if no row wants any.
        let settle = |exchange: &mut dyn Exchange, b: &B, kv: &mut B::Kv| {
            if !linked {
                return Ok(());
            }
            let refs: Vec<&DeviceLink> = links.iter().map(|(_, l, _)| l).collect();
            let done = &mut || b.link_settled(&refs).map_err(|e| e.to_string());
            serving(b, kv, shape, layers.len(), || exchange.settle(done))
                .map(drop)
                .map_err(|e| fail_links(exchange, &e))
        };
        if n == 0 {
            settle(exchange, b, kv)?;
        }
        b.gather_rows(&s.x, h, input.logit_rows, &mut s.h);
        b.rms_norm(&s.h, n, norm, eps, &mut s.x);
        let head = lm_head.as_ref().unwrap_or(embed);
        let mut out = Vec::new();
        // Chunked so the logits buffer stays small whatever the number of sampling rows.
        for chunk in (0..n).step_by(MAX_LOGIT_ROWS) {
            let m = (n - chunk).min(MAX_LOGIT_ROWS);
            b.gather_rows(&s.x, h, &(chunk..chunk + m).collect::<Vec<_>>(), &mut s.h);
            b.linear(&s.h, m, head, None, &mut s.logits);
            if chunk == 0 {
                settle(exchange, b, kv)?;
            }
            out.extend(take(b, &s.logits, m, c.vocab_size));
        }
        Ok(out)
    }
}
