//! The operations the model needs, behind one trait, so the engine runs the same on CPU and GPU.
//!
//! Activations are row-major `[rows, width]` buffers. Weights are `[out, in]` matrices as Hugging
//! Face stores them. The KV cache is one allocation of rBlocks for all layers.

pub mod cpu;
mod cpu_attention;
pub mod cuda;
mod kernel_build;
pub mod nccl;
mod vector_math;

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use crate::sampling::RowDraw;
pub use nccl::LinkError;

/// Geometry of the paged KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    pub layers: usize,
    pub blocks: usize,
    pub block_tokens: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl KvShape {
    /// Floats of K (or of V) in one rBlock of one layer.
    pub fn block_floats(&self) -> usize {
        self.block_tokens * self.kv_heads * self.head_dim
    }

    /// Bytes one rBlock takes for all layers, K and V, in f32.
    pub fn block_bytes_f32(&self) -> usize {
        2 * self.layers * self.block_floats() * std::mem::size_of::<f32>()
    }
}

/// The KV slot of a row whose K and V are not stored here (a creditor stores them).
pub const NO_SLOT: (u32, u32) = (u32::MAX, 0);

/// A run of consecutive tokens stored in one rBlock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvSegment {
    pub block: u32,
    /// Position (in the request) of the block's first token.
    pub first_pos: u32,
    /// Tokens of the block that hold data.
    pub tokens: u32,
}

/// One request's share of an attention call: its query rows and the KV segments they attend to.
/// A query row at position `p` sees the KV tokens at positions `<= p` (causal); segments wholly
/// before the queries need no mask, which is what a creditor holding old blocks sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttnSeq {
    pub rows: Range<usize>,
    /// Position of the first query row; row `i` is at `first_row_pos + i`.
    pub first_row_pos: u32,
    pub segments: Vec<KvSegment>,
}

/// Attention geometry of the model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnShape {
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
}

/// Names one unit of a step's device work for `Backend::replay`: which part of the step, and
/// over how many rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReplayKey {
    pub part: usize,
    pub rows: usize,
}

/// A direct link from this device to one peer's (NCCL between GPUs), as the backend made it.
/// Cloning shares it; aborting the communicator (from any thread) ends it for every holder.
#[derive(Clone)]
pub struct DeviceLink {
    key: usize,
    pub comm: Arc<nccl::Comm>,
}

impl std::fmt::Debug for DeviceLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceLink({})", self.key)
    }
}

pub trait Backend: Send + 'static {
    /// An activation buffer of f32 values on the device.
    type Buf: Send;
    /// A weight matrix or vector on the device.
    type Weight: Send + Sync;
    /// The KV cache on the device.
    type Kv: Send;

    fn name(&self) -> &'static str;

    /// Bytes one rBlock takes for all layers, K and V.
    fn kv_block_bytes(&self, shape: KvShape) -> usize {
        shape.block_bytes_f32()
    }
    /// Device memory still free, where the device has its own (a GPU).
    fn free_memory(&self) -> Option<usize> {
        None
    }

    /// Uploads a `[rows, cols]` weight (a vector has one row).
    fn weight(&self, rows: usize, cols: usize, data: Vec<f32>) -> Self::Weight;
    fn alloc(&self, len: usize) -> Self::Buf;
    fn alloc_kv(&self, shape: KvShape) -> Self::Kv;
    fn upload(&self, data: &[f32], out: &mut Self::Buf);
    fn download(&self, buf: &Self::Buf, len: usize) -> Vec<f32>;

    /// `out[r] = table[ids[r]]`.
    fn embed(&self, table: &Self::Weight, ids: &[u32], out: &mut Self::Buf);
    /// `out[rows, out] = x[rows, in] @ w^T (+ bias)`.
    fn linear(
        &self,
        x: &Self::Buf,
        rows: usize,
        w: &Self::Weight,
        bias: Option<&Self::Weight>,
        out: &mut Self::Buf,
    );
    /// `out[r] = x[r] / rms(x[r]) * w`, computed in f32.
    fn rms_norm(&self, x: &Self::Buf, rows: usize, w: &Self::Weight, eps: f32, out: &mut Self::Buf);
    /// `acc += x` over the first `len` values.
    fn add_assign(&self, acc: &mut Self::Buf, x: &Self::Buf, len: usize);
    /// `acc += x`, then `out = rms_norm(acc) * w`, over `rows` rows of `w`'s width: a residual
    /// add and the norm after it, which a GPU does in one pass.
    fn add_rms_norm(
        &self,
        acc: &mut Self::Buf,
        x: &Self::Buf,
        rows: usize,
        w: &Self::Weight,
        eps: f32,
        out: &mut Self::Buf,
    ) {
        self.add_assign(acc, x, rows * self.weight_cols(w));
        self.rms_norm(acc, rows, w, eps, out);
    }
    /// Columns of a weight (its length, for a vector).
    fn weight_cols(&self, w: &Self::Weight) -> usize;
    /// Rotates, in place, the first `heads` heads of each row (half-split layout, as Llama).
    fn rope(
        &self,
        x: &mut Self::Buf,
        row_width: usize,
        heads: usize,
        head_dim: usize,
        positions: &[u32],
        inv_freq: &[f32],
    );
    /// `out[r] = silu(x[r][..width]) * x[r][width..2 width]`.
    fn silu_mul(&self, x: &Self::Buf, rows: usize, width: usize, out: &mut Self::Buf);
    /// Copies the `rows` rows of `[rows, row_width]` starting at column `col` (one row per slot)
    /// into layer `layer` of the cache, K from `k_src` and V from `v_src`. Rows at `NO_SLOT` are
    /// skipped.
    #[allow(clippy::too_many_arguments)]
    fn kv_write(
        &self,
        kv: &mut Self::Kv,
        layer: usize,
        src: &Self::Buf,
        row_width: usize,
        k_col: usize,
        v_col: usize,
        slots: &[(u32, u32)],
    );
    /// The K and V of rBlock `block` in every layer, laid out `[layer][K, V][block_floats]`,
    /// as f32: what a migration carries to the block's new holder.
    fn kv_read_block(&self, kv: &Self::Kv, block: u32) -> Vec<f32>;
    /// Writes what `kv_read_block` read (on any backend) into rBlock `block`.
    fn kv_write_block(&self, kv: &mut Self::Kv, block: u32, data: &[f32]);
    /// MicroAttention: for each query row and head, the softmax-weighted sum of V over the
    /// sequence's KV segments (`out`, `[rows, q_heads * head_dim]`) and its log-sum-exp
    /// (`lse`, `[rows, q_heads]`). Queries are read from `q` at column `q_col` of rows of
    /// `q_width` values. A row that sees no token gets output 0 and lse -inf.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        q: &Self::Buf,
        q_width: usize,
        q_col: usize,
        kv: &Self::Kv,
        layer: usize,
        shape: AttnShape,
        seqs: &[AttnSeq],
        out: &mut Self::Buf,
        lse: &mut Self::Buf,
    );
    /// Puts this step's host inputs where `replay` units read them: the rotary positions, the KV
    /// slots of the step's rows in `kv`, and the rotary frequencies.
    fn stage_step(
        &self,
        _kv: &Self::Kv,
        _positions: &[u32],
        _slots: &[(u32, u32)],
        _inv_freq: &[f32],
    ) {
    }
    /// Queues the device work `queue` queues. A GPU may record it once, under `key`, and from
    /// then on replay the record instead of calling `queue` (a CUDA graph: one launch instead
    /// of one per kernel). So for one key `queue` must always queue the same work on the same
    /// buffers, and take host inputs only from `stage_step`.
    fn replay(&self, _key: ReplayKey, queue: &mut dyn FnMut()) {
        queue()
    }
    /// Drops every record `replay` made: buffers they use were replaced.
    fn forget_replays(&self) {}
    /// Gathers rows `rows` of `[_, width]` into `out`, in order.
    fn gather_rows(&self, x: &Self::Buf, width: usize, rows: &[usize], out: &mut Self::Buf);
    /// The token each of `rows` rows of `width` logits gives under its draw (the rule of
    /// `sampling`), chosen where the logits are: only token ids come back from a GPU.
    fn sample_rows(&self, x: &Self::Buf, rows: usize, width: usize, draws: &[RowDraw]) -> Vec<u32> {
        let host = self.download(x, rows * width);
        host.chunks(width)
            .zip(draws)
            .map(|(row, d)| crate::sampling::draw(row, d))
            .collect()
    }

    /// Whether this backend can make direct device links (a GPU with NCCL).
    fn has_links(&self) -> bool {
        false
    }
    /// Starts a direct link to a peer's device as the home (NCCL rank 0): the link and the id
    /// the peer joins with. `None` where the backend has no direct links (the CPU).
    fn link_offer(&self) -> Option<Result<(DeviceLink, Vec<u8>), LinkError>> {
        None
    }
    /// Joins the link a home offered, as its creditor.
    fn link_accept(&self, _id: &[u8]) -> Result<DeviceLink, LinkError> {
        Err(LinkError::Unsupported(self.name()))
    }
    /// Home: sends each call's `rows` of `x` (rows of `width`) over its link, all links in one
    /// group, and readies the buffers for `[rows, out_width]` outputs and `[rows, heads]`
    /// log-sum-exps; the device goes on computing meanwhile.
    fn link_call(
        &self,
        _x: &Self::Buf,
        _width: usize,
        _calls: &[(&DeviceLink, &[usize])],
        _out_width: usize,
        _heads: usize,
    ) -> Result<(), LinkError> {
        Err(LinkError::Unsupported(self.name()))
    }
    /// Home: receives `link_call`'s partials and merges each exactly into `out` and `lse` at
    /// the call's rows, once they are there; the host does not wait for them.
    fn link_merge(
        &self,
        _calls: &[(&DeviceLink, &[usize])],
        _out: &mut Self::Buf,
        _lse: &mut Self::Buf,
        _heads: usize,
        _head_dim: usize,
    ) -> Result<(), LinkError> {
        Err(LinkError::Unsupported(self.name()))
    }
    /// Home: whether every merge asked of `link_merge` so far is done; an error on one of
    /// `links` ends the wait.
    fn link_settled(&self, _links: &[&DeviceLink]) -> Result<bool, LinkError> {
        Err(LinkError::Unsupported(self.name()))
    }
    /// Migration over a direct link: queues the K and V of every layer of `blocks` to go to
    /// `link`'s other end (`send`) or to arrive from it, after the device's work so far. Both
    /// ends name as many blocks, in the order they pair up. Leave the blocks alone until
    /// `link_moved` says they moved.
    fn link_move(
        &self,
        _link: &DeviceLink,
        _kv: &mut Self::Kv,
        _blocks: &[u32],
        _send: bool,
    ) -> Result<(), LinkError> {
        Err(LinkError::Unsupported(self.name()))
    }
    /// Whether the moves `link_move` queued on `link` are done.
    fn link_moved(&self, _link: &DeviceLink) -> Result<bool, LinkError> {
        Err(LinkError::Unsupported(self.name()))
    }
    /// Waits for `link_moved`, at most `timeout`; a link that fails or runs out of time is
    /// aborted, so nothing stays queued on it.
    fn link_move_wait(&self, link: &DeviceLink, timeout: Duration) -> Result<(), LinkError> {
        link.comm
            .wait_until("a block move", timeout, || self.link_moved(link))
    }
    /// Creditor: queues a home's step over `link`: for each of `layers`, receive the step's
    /// `[rows, q|k|v]` rows (one row per slot), store the new K/V at `slots`, run
    /// MicroAttention over `seqs` and send `[rows, q_heads * head_dim]` outputs and
    /// `[rows, q_heads]` log-sum-exps back. Returns once queued.
    #[allow(clippy::too_many_arguments)]
    fn link_serve(
        &self,
        _link: &DeviceLink,
        _kv: &mut Self::Kv,
        _layers: Range<usize>,
        _shape: AttnShape,
        _seqs: &[AttnSeq],
        _slots: &[(u32, u32)],
    ) -> Result<(), LinkError> {
        Err(LinkError::Unsupported(self.name()))
    }
}
