//! DistAttention's data path between GPUs. Each link has a stream of its own. A home sends a
//! layer's rows there and receives the partials back there, while its local attention runs on
//! the compute stream; the compute stream waits on the device for the partials before it
//! merges them, so a step is queued whole without the host waiting on any layer. A creditor
//! queues a home's whole step on that link's stream (receive, store K/V, MicroAttention, send,
//! for every layer), beside its own work, so two homes that borrow from each other never wait
//! on each other's compute streams. The host waits, with a deadline, only for the end of a
//! step; a dead peer costs a timeout and an abort, which ends the transfers stuck on it.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};

use super::{Cuda, CudaKv, Lane, Scratch, Table, ok};
use crate::backend::nccl::{self, Comm, LinkError};
use crate::backend::{AttnSeq, AttnShape, DeviceLink, NO_SLOT};

const F32: usize = std::mem::size_of::<f32>();

/// What the device keeps per link.
struct Slot {
    comm: Arc<Comm>,
    /// The link's transfers, and a creditor's work for the link's home.
    stream: Arc<CudaStream>,
    /// Home: the rows sent. Creditor: the rows received.
    rows_buf: Option<CudaSlice<f32>>,
    /// Home: the partials received. Creditor: the partials it computed and sent.
    part_o: Option<CudaSlice<f32>>,
    part_lse: Option<CudaSlice<f32>>,
    /// Home: the step's rows the partials merge into.
    rows: Table<u32>,
    /// Creditor: the tables of its attention for the home.
    scratch: Scratch,
    /// Home: the compute stream after a layer's gathers, and the link's stream after a layer's
    /// receives: where each stream waits for the other.
    gathered: CudaEvent,
    received: CudaEvent,
    /// Block moves queued whose end is not yet marked by `moved` (NCCL may still be enqueueing
    /// them), and the mark.
    moving: bool,
    moved: CudaEvent,
}

impl Slot {
    /// Makes what is queued next on the link's stream wait for `compute`'s work so far.
    fn follow(&self, compute: &CudaStream) -> Result<(), LinkError> {
        self.gathered.record(compute).map_err(cuda("recording"))?;
        self.stream
            .wait(&self.gathered)
            .map_err(cuda("ordering the streams"))
    }
}

/// Every link of this device.
#[derive(Default)]
pub(super) struct Links {
    slots: HashMap<usize, Slot>,
    next: usize,
    /// Home: the compute stream after the last merge of link partials, while not seen done.
    fence: Option<CudaEvent>,
    fenced: bool,
}

fn cuda(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> LinkError {
    move |source| LinkError::Cuda { what, source }
}

/// A buffer of at least `len` values, grown (never shrunk) as needed.
fn at_least<'a>(
    stream: &Arc<CudaStream>,
    buf: &'a mut Option<CudaSlice<f32>>,
    len: usize,
) -> Result<&'a mut CudaSlice<f32>, LinkError> {
    if buf.as_ref().is_none_or(|b| b.len() < len) {
        // SAFETY: every value read from the buffer is written first (by a gather, a receive
        // or a kernel).
        *buf = Some(unsafe { stream.alloc::<f32>(len.max(1)) }.map_err(cuda("allocation"))?);
    }
    Ok(buf.as_mut().expect("allocated above"))
}

fn ptr(stream: &CudaStream, buf: &Option<CudaSlice<f32>>) -> u64 {
    buf.as_ref().expect("sized before").device_ptr(stream).0
}

impl Cuda {
    fn add_link(&self, id: &[u8], rank: i32) -> Result<DeviceLink, LinkError> {
        self.ctx
            .bind_to_thread()
            .map_err(cuda("binding the context"))?;
        let comm = Arc::new(Comm::start(id, rank)?);
        // The link's kernels are few and short, and everything waits on them: they go first
        // when the compute stream's kernels fill the GPU.
        let (_, highest) = cudarc::driver::result::stream::get_priority_range()
            .map_err(cuda("reading stream priorities"))?;
        let stream = self
            .ctx
            .new_stream_with_priority(highest)
            .map_err(cuda("creating the link's stream"))?;
        let event = || self.ctx.new_event(None).map_err(cuda("creating an event"));
        let mut links = self.links.borrow_mut();
        // Links whose peer was lost were aborted; their buffers go now.
        links.slots.retain(|_, s| s.comm.with(|_| ()).is_ok());
        links.next += 1;
        let key = links.next;
        links.slots.insert(
            key,
            Slot {
                comm: comm.clone(),
                stream,
                rows_buf: None,
                part_o: None,
                part_lse: None,
                rows: Table::new(),
                scratch: Scratch::new(),
                gathered: event()?,
                received: event()?,
                moving: false,
                moved: event()?,
            },
        );
        Ok(DeviceLink { key, comm })
    }

    pub(super) fn offer_link(&self) -> Result<(DeviceLink, Vec<u8>), LinkError> {
        let id = nccl::unique_id()?;
        Ok((self.add_link(&id, 0)?, id))
    }

    pub(super) fn accept_link(&self, id: &[u8]) -> Result<DeviceLink, LinkError> {
        self.add_link(id, 1)
    }

    /// Home: gathers each call's rows of `x` and sends them over its link; the receive
    /// buffers of `[rows, out_width]` outputs and `[rows, heads]` log-sum-exps are sized for
    /// `merge_links`.
    pub(super) fn call_links(
        &self,
        x: &CudaSlice<f32>,
        width: usize,
        calls: &[(&DeviceLink, &[usize])],
        out_width: usize,
        heads: usize,
    ) -> Result<(), LinkError> {
        let mut links = self.links.borrow_mut();
        for (link, rows) in calls {
            let slot = links.slots.get_mut(&link.key).ok_or(LinkError::Aborted)?;
            // Rows that follow each other (one request's) are sent from `x` itself.
            let run = rows.windows(2).all(|w| w[1] == w[0] + 1);
            let first = rows.first().copied().unwrap_or(0);
            if !run {
                let send = at_least(&self.stream, &mut slot.rows_buf, rows.len() * width)?;
                crate::backend::Backend::gather_rows(self, x, width, rows, send);
            }
            at_least(&self.stream, &mut slot.part_o, rows.len() * out_width)?;
            at_least(&self.stream, &mut slot.part_lse, rows.len() * heads)?;
            // The send starts after `x` is written (and the gather, and so after the last
            // merge that read the receive buffers).
            slot.follow(&self.stream)?;
            let from = if run {
                let at = (first * width * F32) as u64;
                x.device_ptr(&slot.stream).0 + at
            } else {
                ptr(&slot.stream, &slot.rows_buf)
            };
            let op = (&*slot.comm, from, rows.len() * width * F32, true);
            // SAFETY: `x` (rows `first..` of it) or the gathered rows are only written again by
            // the next layer's projection or gather, which the compute stream runs after this
            // layer's merge, itself after the receive that follows this send on the link's
            // stream.
            unsafe { nccl::group(slot.stream.cu_stream() as _, &[op])? };
        }
        Ok(())
    }

    /// Home: receives each call's partials and folds them into `out` and `lse` at its rows.
    /// Only the device waits for them: the host learns they came with `links_settled`.
    pub(super) fn merge_links(
        &self,
        calls: &[(&DeviceLink, &[usize])],
        out: &mut CudaSlice<f32>,
        lse: &mut CudaSlice<f32>,
        heads: usize,
        head_dim: usize,
    ) -> Result<(), LinkError> {
        let out_width = heads * head_dim;
        let mut links = self.links.borrow_mut();
        for (link, rows) in calls {
            let slot = links.slots.get_mut(&link.key).ok_or(LinkError::Aborted)?;
            let n = rows.len();
            let recvs = [
                (
                    &*slot.comm,
                    ptr(&slot.stream, &slot.part_o),
                    n * out_width * F32,
                    false,
                ),
                (
                    &*slot.comm,
                    ptr(&slot.stream, &slot.part_lse),
                    n * heads * F32,
                    false,
                ),
            ];
            // SAFETY: the buffers, sized by call_links for these rows, are read only by the
            // merge below, which the compute stream runs after the receives.
            unsafe { nccl::group(slot.stream.cu_stream() as _, &recvs)? };
            // An event recorded before the receives are really on the stream would not wait.
            slot.comm.wait_enqueued()?;
            slot.received
                .record(&slot.stream)
                .map_err(cuda("recording"))?;
            self.stream
                .wait(&slot.received)
                .map_err(cuda("ordering the streams"))?;
            if n == 0 {
                continue;
            }
            let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
            let rows_dev = slot.rows.put(&self.stream, &idx);
            let hd = head_dim as i32;
            let mut b = self.stream.launch_builder(&self.k.attn_merge_rows);
            b.arg(slot.part_o.as_ref().expect("received"))
                .arg(slot.part_lse.as_ref().expect("received"))
                .arg(rows_dev)
                .arg(&hd)
                .arg(&mut *out)
                .arg(&mut *lse);
            let cfg = LaunchConfig {
                grid_dim: (n as u32, heads as u32, 1),
                block_dim: (head_dim.min(1024) as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the partials hold n rows of `heads` heads; every index names a row of
            // out and lse.
            ok(unsafe { b.launch(cfg) }, "merging a link's partials");
        }
        if links.fence.is_none() {
            links.fence = Some(
                self.ctx
                    .new_event(None)
                    .map_err(cuda("creating an event"))?,
            );
        }
        let fence = links.fence.as_ref().expect("created above");
        fence.record(&self.stream).map_err(cuda("recording"))?;
        links.fenced = true;
        Ok(())
    }

    /// Home: whether the compute stream has merged every partial asked for so far. An error
    /// on one of `links` (an abort included) ends the wait.
    pub(super) fn links_settled(&self, links: &[&DeviceLink]) -> Result<bool, LinkError> {
        for link in links {
            link.comm.ready()?;
        }
        let mut all = self.links.borrow_mut();
        let done = match &all.fence {
            Some(fence) if all.fenced => {
                fence.try_is_complete().map_err(cuda("waiting on a link"))?
            }
            _ => true,
        };
        all.fenced &= !done;
        Ok(done)
    }

    /// Queues the K and V of every layer of `blocks` to go to the link's other end (`send`) or
    /// to arrive from it, one NCCL group on the link's stream, after the compute stream's work
    /// so far. The other end queues the same blocks count in the same order: the i-th block
    /// sent lands in the i-th block received.
    pub(super) fn move_blocks(
        &self,
        link: &DeviceLink,
        kv: &mut CudaKv,
        blocks: &[u32],
        send: bool,
    ) -> Result<(), LinkError> {
        let mut links = self.links.borrow_mut();
        let slot = links.slots.get_mut(&link.key).ok_or(LinkError::Aborted)?;
        slot.follow(&self.stream)?;
        let n = kv.shape.block_floats();
        let bytes = n * std::mem::size_of::<u16>();
        let (k, v) = (
            kv.k.device_ptr(&slot.stream).0,
            kv.v.device_ptr(&slot.stream).0,
        );
        let mut ops = Vec::with_capacity(blocks.len() * kv.shape.layers * 2);
        for &block in blocks {
            assert!(
                (block as usize) < kv.shape.blocks,
                "block {block} is out of the pool"
            );
            for layer in 0..kv.shape.layers {
                let at = ((layer * kv.shape.blocks + block as usize) * bytes) as u64;
                ops.push((&*slot.comm, k + at, bytes, send));
                ops.push((&*slot.comm, v + at, bytes, send));
            }
        }
        // SAFETY: each pointer names one layer's K or V of a block inside the pool, which
        // lives as long as the device. The caller does not touch the blocks until
        // `blocks_moved` says they moved.
        unsafe { nccl::group(slot.stream.cu_stream() as _, &ops)? };
        slot.moving = true;
        Ok(())
    }

    /// Whether the block moves queued on `link` are done; an error on the link (an abort
    /// included) is returned as such.
    pub(super) fn blocks_moved(&self, link: &DeviceLink) -> Result<bool, LinkError> {
        let mut links = self.links.borrow_mut();
        let slot = links.slots.get_mut(&link.key).ok_or(LinkError::Aborted)?;
        // The mark goes on the stream only once NCCL has put the transfers there.
        if !slot.comm.ready()? {
            return Ok(false);
        }
        if slot.moving {
            slot.moved.record(&slot.stream).map_err(cuda("recording"))?;
            slot.moving = false;
        }
        slot.moved
            .try_is_complete()
            .map_err(cuda("waiting on a link"))
    }

    /// Creditor: queues a home's step on the link's stream: for each of `layers`, receive the
    /// rows (`[rows, q|k|v]`), store the new K/V at `slots`, attend over `seqs`' lent blocks
    /// and send the partials back.
    pub(super) fn serve_link(
        &self,
        link: &DeviceLink,
        kv: &mut CudaKv,
        layers: Range<usize>,
        shape: AttnShape,
        seqs: &[AttnSeq],
        slots: &[(u32, u32)],
    ) -> Result<(), LinkError> {
        let (qw, kvw) = (
            shape.q_heads * shape.head_dim,
            shape.kv_heads * shape.head_dim,
        );
        let width = qw + 2 * kvw;
        let rows = slots.len();
        let mut links = self.links.borrow_mut();
        let Slot {
            comm,
            stream,
            rows_buf,
            part_o,
            part_lse,
            scratch,
            ..
        } = links.slots.get_mut(&link.key).ok_or(LinkError::Aborted)?;
        at_least(stream, rows_buf, rows * width)?;
        at_least(stream, part_o, rows * qw)?;
        at_least(stream, part_lse, rows * shape.q_heads)?;
        let (x, out, lse) = (
            rows_buf.as_ref().expect("sized"),
            part_o.as_mut().expect("sized"),
            part_lse.as_mut().expect("sized"),
        );
        let stores = slots.iter().any(|&s| s != NO_SLOT);
        for layer in layers {
            let recv = (&**comm, x.device_ptr(stream).0, rows * width * F32, false);
            // SAFETY: `x` holds rows * width values; the stream runs this step's kernels (and
            // the last step's) in order around the receive.
            unsafe { nccl::group(stream.cu_stream() as _, &[recv])? };
            // The kernels must not be queued before the receive they read.
            comm.wait_enqueued()?;
            if stores {
                let lane = Lane {
                    stream,
                    scratch: &mut *scratch,
                };
                self.kv_write_on(lane, kv, layer, x, width, qw, qw + kvw, slots);
            }
            let lane = Lane {
                stream,
                scratch: &mut *scratch,
            };
            self.attention_on(lane, x, width, 0, kv, layer, shape, seqs, out, lse);
            let sends = [
                (&**comm, out.device_ptr(stream).0, rows * qw * F32, true),
                (
                    &**comm,
                    lse.device_ptr(stream).0,
                    rows * shape.q_heads * F32,
                    true,
                ),
            ];
            // SAFETY: as above; the next layer's kernels write the partials after the stream
            // has passed these sends.
            unsafe { nccl::group(stream.cu_stream() as _, &sends)? };
        }
        Ok(())
    }
}
