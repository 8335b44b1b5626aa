//! DistAttention's data path: the queries a home sends to each creditor for one layer, the
//! MicroAttention a creditor runs over the blocks it lent, and the exact merge of the partial
//! outputs back at the home. KV never moves; only queries, new K/V rows and partials do.
//!
//! Between GPUs with a direct link (NCCL), one call a step crosses the peer connection, with
//! only the metadata; the creditor queues every layer's work at once, and each layer's rows
//! and partials travel over the link, device to device.

use std::collections::BTreeMap;

use crate::backend::{AttnSeq, AttnShape, Backend, DeviceLink, KvSegment, NO_SLOT};
use crate::merge::merge_into;

/// One request's attention over the blocks one creditor holds for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemotePart {
    pub peer: u16,
    pub seq: u64,
    /// Index into `Step::attn`: the rows and positions of the queries.
    pub attn: usize,
    /// The creditor's blocks, in its own ids.
    pub segments: Vec<KvSegment>,
    /// Rows whose new K and V the creditor stores: (row, block, offset).
    pub appends: Vec<(usize, u32, u32)>,
}

/// A new token's K and V that the creditor stores in a block it lent.
#[derive(Debug, Clone, PartialEq)]
pub struct Append {
    /// Row within the part.
    pub row: u32,
    pub block: u32,
    pub offset: u32,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

/// One request's queries for one creditor.
#[derive(Debug, Clone, PartialEq)]
pub struct PartIn {
    pub seq: u64,
    pub first_row_pos: u32,
    pub rows: u32,
    /// `[rows, q_heads * head_dim]`, RoPE applied.
    pub q: Vec<f32>,
    pub segments: Vec<KvSegment>,
    pub appends: Vec<Append>,
}

/// Everything one home asks one creditor for one layer of one step (for a linked call, for
/// the rest of the step).
#[derive(Debug, Clone, PartialEq)]
pub struct AttnCall {
    /// For a linked call, the first of the layers it covers: every one from there on.
    pub layer: u32,
    /// The rows come over the direct link, whole (`[rows, q|k|v]`), and the partials go back
    /// the same way; `q` and the appends' `k`/`v` are then empty.
    pub linked: bool,
    pub parts: Vec<PartIn>,
}

/// A creditor's partial result for one part: `[rows, q_heads * head_dim]` and `[rows, q_heads]`.
#[derive(Debug, Clone, PartialEq)]
pub struct PartOut {
    pub o: Vec<f32>,
    pub lse: Vec<f32>,
}

/// Where the stacked q, k, v of a row sit (`[rows, width]`, q then k then v).
#[derive(Debug, Clone, Copy)]
pub struct QkvLayout {
    pub width: usize,
    pub q: usize,
    pub kv: usize,
}

/// Builds one call per creditor from this layer's stacked q/k/v rows: with their values from
/// `qkv` (on the host), or, for linked creditors (`qkv` is `None`), without them.
pub fn build_calls<'a>(
    layer: usize,
    qkv: Option<&[f32]>,
    layout: QkvLayout,
    seqs: &[AttnSeq],
    remote: impl IntoIterator<Item = &'a RemotePart>,
) -> BTreeMap<u16, AttnCall> {
    let mut calls: BTreeMap<u16, AttnCall> = BTreeMap::new();
    for part in remote {
        let seq = &seqs[part.attn];
        let row_of =
            |r: usize| qkv.map_or(&[][..], |x| &x[r * layout.width..(r + 1) * layout.width]);
        let cols = |r: usize, c: std::ops::Range<usize>| row_of(r).get(c).unwrap_or(&[]).to_vec();
        let q = seq
            .rows
            .clone()
            .flat_map(|r| cols(r, 0..layout.q))
            .collect();
        let appends = part
            .appends
            .iter()
            .map(|&(row, block, offset)| Append {
                row: (row - seq.rows.start) as u32,
                block,
                offset,
                k: cols(row, layout.q..layout.q + layout.kv),
                v: cols(row, layout.q + layout.kv..layout.q + 2 * layout.kv),
            })
            .collect();
        calls
            .entry(part.peer)
            .or_insert_with(|| AttnCall {
                layer: layer as u32,
                linked: qkv.is_none(),
                parts: Vec::new(),
            })
            .parts
            .push(PartIn {
                seq: part.seq,
                first_row_pos: seq.first_row_pos,
                rows: seq.rows.len() as u32,
                q,
                segments: part.segments.clone(),
                appends,
            });
    }
    calls
}

/// The rows each linked creditor gets, in the order of its call's parts: what the home sends
/// over the link.
pub fn linked_rows<'a>(
    seqs: &[AttnSeq],
    remote: impl IntoIterator<Item = &'a RemotePart>,
) -> BTreeMap<u16, Vec<usize>> {
    let mut rows: BTreeMap<u16, Vec<usize>> = BTreeMap::new();
    for part in remote {
        rows.entry(part.peer)
            .or_default()
            .extend(seqs[part.attn].rows.clone());
    }
    rows
}

/// The creditor's answer to a call: inline partials, or none when they go over the link (which
/// a linked call needs). A model of `layers` layers serves a linked call's layers from its
/// `layer` on, the whole step at once.
pub fn answer<B: Backend>(
    backend: &B,
    kv: &mut B::Kv,
    shape: AttnShape,
    layers: usize,
    call: &AttnCall,
    link: Option<&DeviceLink>,
) -> Result<Vec<PartOut>, String> {
    if !call.linked {
        return Ok(serve_call(backend, kv, shape, call));
    }
    let link = link.ok_or("a linked call without a link to its home")?;
    let rows: usize = call.parts.iter().map(|p| p.rows as usize).sum();
    let mut slots = vec![NO_SLOT; rows];
    let mut seqs = Vec::with_capacity(call.parts.len());
    let mut start = 0;
    for p in &call.parts {
        for a in &p.appends {
            slots[start + a.row as usize] = (a.block, a.offset);
        }
        seqs.push(AttnSeq {
            rows: start..start + p.rows as usize,
            first_row_pos: p.first_row_pos,
            segments: p.segments.clone(),
        });
        start += p.rows as usize;
    }
    let layers = call.layer as usize..layers;
    backend
        .link_serve(link, kv, layers, shape, &seqs, &slots)
        .map(|()| Vec::new())
        .map_err(|e| e.to_string())
}

/// The creditor's side: stores the new K/V rows, then runs MicroAttention for every part.
pub fn serve_call<B: Backend>(
    backend: &B,
    kv: &mut B::Kv,
    shape: AttnShape,
    call: &AttnCall,
) -> Vec<PartOut> {
    let (qw, kvw) = (
        shape.q_heads * shape.head_dim,
        shape.kv_heads * shape.head_dim,
    );
    let layer = call.layer as usize;
    let rows: usize = call.parts.iter().map(|p| p.rows as usize).sum();
    let appends: Vec<&Append> = call.parts.iter().flat_map(|p| &p.appends).collect();
    if !appends.is_empty() {
        let mut src = Vec::with_capacity(appends.len() * 2 * kvw);
        let mut slots = Vec::with_capacity(appends.len());
        for a in &appends {
            src.extend_from_slice(&a.k);
            src.extend_from_slice(&a.v);
            slots.push((a.block, a.offset));
        }
        debug_assert!(!slots.contains(&NO_SLOT));
        let mut buf = backend.alloc(src.len());
        backend.upload(&src, &mut buf);
        backend.kv_write(kv, layer, &buf, 2 * kvw, 0, kvw, &slots);
    }
    let mut q = Vec::with_capacity(rows * qw);
    let mut seqs = Vec::with_capacity(call.parts.len());
    for p in &call.parts {
        let start = q.len() / qw;
        q.extend_from_slice(&p.q);
        seqs.push(AttnSeq {
            rows: start..start + p.rows as usize,
            first_row_pos: p.first_row_pos,
            segments: p.segments.clone(),
        });
    }
    let mut qbuf = backend.alloc(q.len().max(1));
    backend.upload(&q, &mut qbuf);
    let mut out = backend.alloc((rows * qw).max(1));
    let mut lse = backend.alloc((rows * shape.q_heads).max(1));
    backend.attention(&qbuf, qw, 0, kv, layer, shape, &seqs, &mut out, &mut lse);
    let (o, l) = (
        backend.download(&out, rows * qw),
        backend.download(&lse, rows * shape.q_heads),
    );
    seqs.iter()
        .map(|s| PartOut {
            o: o[s.rows.start * qw..s.rows.end * qw].to_vec(),
            lse: l[s.rows.start * shape.q_heads..s.rows.end * shape.q_heads].to_vec(),
        })
        .collect()
}

/// Folds a creditor's partials into the home's attention output (`[rows, q_heads * head_dim]`)
/// and log-sum-exp (`[rows, q_heads]`), which hold the local partials. An answer that does not
/// fit the call (a part too many or too few, rows of the wrong size) is refused whole, before
/// anything is merged.
pub fn merge_call(
    out: &mut [f32],
    lse: &mut [f32],
    shape: AttnShape,
    seqs: &[AttnSeq],
    parts: &[&RemotePart],
    results: &[PartOut],
) -> Result<(), String> {
    let (h, hd) = (shape.q_heads, shape.head_dim);
    if parts.len() != results.len() {
        return Err(format!(
            "a creditor answered {} parts to a call of {}",
            results.len(),
            parts.len()
        ));
    }
    for (part, res) in parts.iter().zip(results) {
        let rows = seqs[part.attn].rows.len();
        if res.lse.len() != rows * h || res.o.len() != rows * h * hd {
            return Err(format!(
                "a creditor answered {} values for a part of {rows} rows",
                res.lse.len()
            ));
        }
    }
    for (part, res) in parts.iter().zip(results) {
        for (i, row) in seqs[part.attn].rows.clone().enumerate() {
            for head in 0..h {
                let at = (row * h + head) * hd;
                let from = (i * h + head) * hd;
                merge_into(
                    &mut out[at..at + hd],
                    &mut lse[row * h + head],
                    &res.o[from..from + hd],
                    res.lse[i * h + head],
                );
            }
        }
    }
    Ok(())
}
