//! DistAttention's data path between GPUs: the rows a home sends each creditor and the partial
//! results it gets back travel over NCCL links, on a stream of their own, while the home's
//! local attention runs on the compute stream. The host only orders the two streams and waits,
//! with a deadline, for a link's transfers before their results are used, so a dead peer costs
//! a timeout and an abort, never a hung GPU stream.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};

use super::{Cuda, Table, ok};
use crate::backend::DeviceLink;
use crate::backend::nccl::{self, Comm, LinkError};

/// What the device keeps per link.
struct Slot {
    comm: Arc<Comm>,
    /// Home: the rows sent, and the partials received.
    send: Option<CudaSlice<f32>>,
    part_o: Option<CudaSlice<f32>>,
    part_lse: Option<CudaSlice<f32>>,
    rows: Table<u32>,
    /// Home: a group was posted whose partials are not merged yet.
    posted: bool,
    /// Creditor: what the last answer sent, alive until the link stream has moved past it.
    kept: Vec<CudaSlice<f32>>,
}

/// Every link of this device, and the stream their transfers run on.
#[derive(Default)]
pub(super) struct Links {
    stream: Option<Arc<CudaStream>>,
    slots: HashMap<usize, Slot>,
    next: usize,
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
        // SAFETY: every value read from the buffer is written first (by a gather or a receive).
        *buf = Some(unsafe { stream.alloc::<f32>(len.max(1)) }.map_err(cuda("allocation"))?);
    }
    Ok(buf.as_mut().expect("allocated above"))
}

/// Polls `event` until it completes or `timeout` passes; the link's own errors end it sooner.
fn wait_for(event: &CudaEvent, comm: &Comm, timeout: Duration) -> Result<(), LinkError> {
    let deadline = Instant::now() + timeout;
    loop {
        if event.try_is_complete().map_err(cuda("waiting on a link"))? {
            return Ok(());
        }
        comm.ready()?;
        if Instant::now() >= deadline {
            comm.abort();
            return Err(LinkError::Timeout {
                what: "a transfer over the link",
                after: timeout,
            });
        }
        std::thread::yield_now();
    }
}

impl Cuda {
    fn link_stream(&self, links: &mut Links) -> Result<Arc<CudaStream>, LinkError> {
        if links.stream.is_none() {
            links.stream = Some(
                self.stream
                    .fork()
                    .map_err(cuda("creating the link stream"))?,
            );
        }
        Ok(links.stream.clone().expect("created above"))
    }

    fn add_link(&self, id: &[u8], rank: i32) -> Result<DeviceLink, LinkError> {
        self.ctx
            .bind_to_thread()
            .map_err(cuda("binding the context"))?;
        let comm = Arc::new(Comm::start(id, rank)?);
        let mut links = self.links.borrow_mut();
        self.link_stream(&mut links)?;
        // Links whose peer was lost were aborted; their buffers go now.
        links.slots.retain(|_, s| s.comm.with(|_| ()).is_ok());
        links.next += 1;
        let key = links.next;
        links.slots.insert(
            key,
            Slot {
                comm: comm.clone(),
                send: None,
                part_o: None,
                part_lse: None,
                rows: Table::new(),
                posted: false,
                kept: Vec::new(),
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

    /// Home: gathers each call's rows of `x` and sends them, in one group over all links; the
    /// receive buffers of `[rows, out_width]` outputs and `[rows, heads]` log-sum-exps are
    /// sized for `merge_links`.
    pub(super) fn call_links(
        &self,
        x: &CudaSlice<f32>,
        width: usize,
        calls: &[(&DeviceLink, &[usize])],
        out_width: usize,
        heads: usize,
    ) -> Result<(), LinkError> {
        let mut links = self.links.borrow_mut();
        let stream = self.link_stream(&mut links)?;
        for (link, rows) in calls {
            let slot = links.slots.get_mut(&link.key).ok_or(LinkError::Aborted)?;
            if slot.posted {
                // A failed step left this link's last partials unreceived: what it would
                // receive next is stale, so the link is given up (its creditor recomputed).
                link.comm.abort();
                return Err(LinkError::OutOfStep);
            }
            let send = at_least(&self.stream, &mut slot.send, rows.len() * width)?;
            crate::backend::Backend::gather_rows(self, x, width, rows, send);
            at_least(&self.stream, &mut slot.part_o, rows.len() * out_width)?;
            at_least(&self.stream, &mut slot.part_lse, rows.len() * heads)?;
        }
        // The link stream starts after the gathers (and so after the last merge that read the
        // receive buffers).
        stream
            .join(&self.stream)
            .map_err(cuda("ordering the streams"))?;
        // Only the sends now; each link's receives once its creditor has answered. NCCL sets
        // up a pair's connections in the first group that uses them, and both ends must ask
        // for the same ones at once: the creditor's receive, then its send.
        let sends: Vec<_> = calls
            .iter()
            .map(|(link, rows)| {
                let send = links.slots[&link.key].send.as_ref().expect("sized above");
                (
                    &*link.comm,
                    send.device_ptr(&stream).0,
                    rows.len() * width,
                    true,
                )
            })
            .collect();
        // SAFETY: the send buffers are this device's and are only written again by the next
        // call's gathers, after merge_links waited for these sends.
        unsafe { nccl::group(stream.cu_stream() as _, &sends)? };
        for (link, _) in calls {
            links
                .slots
                .get_mut(&link.key)
                .expect("checked above")
                .posted = true;
        }
        Ok(())
    }

    /// Home: receives each call's partials (its creditor has sent them), waits for them, and
    /// folds them into `out` and `lse` at its rows.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn merge_links(
        &self,
        calls: &[(&DeviceLink, &[usize])],
        timeout: Duration,
        out: &mut CudaSlice<f32>,
        lse: &mut CudaSlice<f32>,
        heads: usize,
        head_dim: usize,
    ) -> Result<(), LinkError> {
        let out_width = heads * head_dim;
        let mut links = self.links.borrow_mut();
        let stream = self.link_stream(&mut links)?;
        for (link, rows) in calls {
            let slot = links.slots.get_mut(&link.key).ok_or(LinkError::Aborted)?;
            if std::mem::take(&mut slot.posted) {
                let n = rows.len();
                let ptr =
                    |b: &Option<CudaSlice<f32>>| b.as_ref().expect("sized").device_ptr(&stream).0;
                let recvs = [
                    (&*slot.comm, ptr(&slot.part_o), n * out_width, false),
                    (&*slot.comm, ptr(&slot.part_lse), n * heads, false),
                ];
                // SAFETY: the slot's buffers, sized by call_links for these rows, are only
                // read by the merge below, which waits for the receives.
                unsafe { nccl::group(stream.cu_stream() as _, &recvs)? };
                // Only once the group is enqueued does an event after it mean its end.
                slot.comm.wait_ready(timeout)?;
                let done = stream.record_event(None).map_err(cuda("recording"))?;
                wait_for(&done, &slot.comm, timeout)?;
            }
            if rows.is_empty() {
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
                grid_dim: (rows.len() as u32, heads as u32, 1),
                block_dim: (head_dim.min(1024) as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the partials hold rows.len() rows of `heads` heads; every index names a
            // row of out and lse.
            ok(unsafe { b.launch(cfg) }, "merging a link's partials");
        }
        Ok(())
    }

    /// Creditor: receives `len` values from the home, waiting at most `timeout`.
    pub(super) fn recv_link(
        &self,
        link: &DeviceLink,
        len: usize,
        timeout: Duration,
    ) -> Result<CudaSlice<f32>, LinkError> {
        let mut links = self.links.borrow_mut();
        let stream = self.link_stream(&mut links)?;
        let slot = links.slots.get_mut(&link.key).ok_or(LinkError::Aborted)?;
        // SAFETY: filled by the receive before anything reads it.
        let buf = unsafe { self.stream.alloc::<f32>(len.max(1)) }.map_err(cuda("allocation"))?;
        // The receive must not start before the allocation is usable.
        stream
            .join(&self.stream)
            .map_err(cuda("ordering the streams"))?;
        let ptr = buf.device_ptr(&stream).0;
        // SAFETY: `buf` holds `len` values and nothing reads it before the receive is done.
        unsafe { nccl::group(stream.cu_stream() as _, &[(&*link.comm, ptr, len, false)])? };
        link.comm.wait_ready(timeout)?;
        let done = stream.record_event(None).map_err(cuda("recording"))?;
        wait_for(&done, &slot.comm, timeout)?;
        // The receive also means the last answer's sends are through (one stream, in order).
        slot.kept.clear();
        Ok(buf)
    }

    /// Creditor: sends `bufs` (each its first `len` values) to the home, after the compute
    /// stream's work on them; they stay alive until the next receive.
    pub(super) fn send_link(
        &self,
        link: &DeviceLink,
        bufs: Vec<(CudaSlice<f32>, usize)>,
    ) -> Result<(), LinkError> {
        let mut links = self.links.borrow_mut();
        let stream = self.link_stream(&mut links)?;
        stream
            .join(&self.stream)
            .map_err(cuda("ordering the streams"))?;
        let ops: Vec<_> = bufs
            .iter()
            .map(|(b, len)| (&*link.comm, b.device_ptr(&stream).0, *len, true))
            .collect();
        // SAFETY: the buffers are kept in the slot until the link stream has passed the sends.
        unsafe { nccl::group(stream.cu_stream() as _, &ops)? };
        let slot = links.slots.get_mut(&link.key).ok_or(LinkError::Aborted)?;
        slot.kept.extend(bufs.into_iter().map(|(b, _)| b));
        Ok(())
    }
}
