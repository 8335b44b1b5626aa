//! NCCL communicators for direct GPU-to-GPU links between workers.
//!
//! A link has two ranks: the home that borrows (rank 0, which makes the unique id) and the
//! creditor that lends (rank 1). It lives as long as the peer connection that carried the id,
//! so a connection is a membership epoch: a worker that comes back gets a new connection, a
//! new index and a new communicator, and nothing of the old one can be confused with it.
//!
//! Communicators are non-blocking: initialisation and enqueues return at once, errors are
//! polled, and `abort` (callable from any thread, for example the one that saw the peer's
//! connection close) makes operations stuck on a dead peer return, so a dead worker never
//! hangs the living.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use cudarc::nccl::sys;

/// How long a link may take to connect before it is given up.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// How long enqueueing a group may take on a non-blocking link.
const ENQUEUE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("the {0} backend has no direct device links")]
    Unsupported(&'static str),
    #[error(
        "no NCCL library: libnccl.so must be on the library path (a link to libnccl.so.2 will do)"
    )]
    NoLibrary,
    #[error("NCCL {what}: {code:?}")]
    Nccl {
        what: &'static str,
        code: sys::ncclResult_t,
    },
    #[error("the link was aborted (its peer was lost)")]
    Aborted,
    #[error("a unique id has {0} bytes, not 128")]
    BadId(usize),
    #[error("{what} did not finish within {after:?}")]
    Timeout { what: &'static str, after: Duration },
    #[error("CUDA {what}: {source}")]
    Cuda {
        what: &'static str,
        #[source]
        source: cudarc::driver::DriverError,
    },
}

/// Whether the NCCL library can be loaded here.
pub fn available() -> bool {
    // SAFETY: only probes whether the library can be opened.
    unsafe { sys::is_culib_present() }
}

fn check(what: &'static str, code: sys::ncclResult_t) -> Result<bool, LinkError> {
    match code {
        sys::ncclResult_t::ncclSuccess => Ok(true),
        sys::ncclResult_t::ncclInProgress => Ok(false),
        code => Err(LinkError::Nccl { what, code }),
    }
}

/// A fresh unique id for rank 0 to hand to rank 1.
pub fn unique_id() -> Result<Vec<u8>, LinkError> {
    if !available() {
        return Err(LinkError::NoLibrary);
    }
    let mut id = sys::ncclUniqueId { internal: [0; 128] };
    // SAFETY: writes the 128 bytes of `id`.
    check("getting a unique id", unsafe {
        sys::ncclGetUniqueId(&mut id)
    })?;
    Ok(id.internal.iter().map(|&c| c as u8).collect())
}

/// `NCCL_CONFIG_INITIALIZER` of the 2.28 headers with `blocking = 0`: the other fields keep
/// NCCL's defaults (INT_MIN and null mean "not set").
fn non_blocking_config() -> sys::ncclConfig_t {
    const UNSET: i32 = i32::MIN;
    sys::ncclConfig_t {
        size: std::mem::size_of::<sys::ncclConfig_t>(),
        magic: 0xcafe_beef,
        version: 22800,
        blocking: 0,
        cgaClusterSize: UNSET,
        minCTAs: UNSET,
        maxCTAs: UNSET,
        netName: std::ptr::null(),
        splitShare: UNSET,
        trafficClass: UNSET,
        commName: std::ptr::null(),
        collnetEnable: UNSET,
        CTAPolicy: UNSET,
        shrinkShare: UNSET,
        nvlsCTAs: UNSET,
        nChannelsPerNetPeer: UNSET,
        nvlinkCentricSched: UNSET,
    }
}

/// One two-rank communicator. The raw handle sits behind a lock so that an abort from another
/// thread never races an enqueue.
pub struct Comm {
    raw: Mutex<Option<sys::ncclComm_t>>,
    rank: i32,
}

// SAFETY: the handle is only used under the lock, and NCCL allows a communicator to be used
// and aborted from different threads as long as calls do not overlap.
unsafe impl Send for Comm {}
// SAFETY: as above.
unsafe impl Sync for Comm {}

impl Comm {
    /// Starts joining the link as `rank` (0: the home, 1: the creditor); returns at once. The
    /// calling thread must have the GPU's context current.
    pub fn start(id: &[u8], rank: i32) -> Result<Self, LinkError> {
        if !available() {
            return Err(LinkError::NoLibrary);
        }
        let mut unique = sys::ncclUniqueId { internal: [0; 128] };
        if id.len() != unique.internal.len() {
            return Err(LinkError::BadId(id.len()));
        }
        for (d, &s) in unique.internal.iter_mut().zip(id) {
            *d = s as _;
        }
        let mut config = non_blocking_config();
        let mut raw: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `raw` and `config` outlive the call; NCCL copies the id.
        let code = unsafe { sys::ncclCommInitRankConfig(&mut raw, 2, unique, rank, &mut config) };
        check("starting a communicator", code)?;
        Ok(Self {
            raw: Mutex::new(Some(raw)),
            rank,
        })
    }

    /// The other end's rank.
    pub fn peer_rank(&self) -> i32 {
        1 - self.rank
    }

    /// Whether every operation enqueued so far has been accepted (initialisation included);
    /// an error or an abort is returned as such.
    pub fn ready(&self) -> Result<bool, LinkError> {
        self.with(|raw| {
            let mut state = sys::ncclResult_t::ncclSuccess;
            // SAFETY: a live communicator; `state` outlives the call.
            check("polling the link", unsafe {
                sys::ncclCommGetAsyncError(raw, &mut state)
            })?;
            check("the link", state)
        })?
    }

    /// Waits until `ready`, at most `timeout`; gives the link up (aborts it) otherwise.
    pub fn wait_ready(&self, timeout: Duration) -> Result<(), LinkError> {
        self.wait_until("the link", timeout, || self.ready())
    }

    /// Polls `done` until it says so, at most `timeout`. An error, or running out of time,
    /// gives the link up (aborts it): its other end then fails too rather than waits.
    pub fn wait_until(
        &self,
        what: &'static str,
        timeout: Duration,
        mut done: impl FnMut() -> Result<bool, LinkError>,
    ) -> Result<(), LinkError> {
        let deadline = Instant::now() + timeout;
        loop {
            match done() {
                Ok(true) => return Ok(()),
                Ok(false) if Instant::now() < deadline => std::thread::yield_now(),
                Ok(false) => {
                    self.abort();
                    return Err(LinkError::Timeout {
                        what,
                        after: timeout,
                    });
                }
                Err(e) => {
                    self.abort();
                    return Err(e);
                }
            }
        }
    }

    /// Waits until the groups enqueued so far are on their streams: only then does work
    /// queued after them on a stream run after them.
    pub fn wait_enqueued(&self) -> Result<(), LinkError> {
        self.wait_ready(ENQUEUE_TIMEOUT)
    }

    /// Runs `f` with the live handle; fails once the link is aborted.
    pub fn with<R>(&self, f: impl FnOnce(sys::ncclComm_t) -> R) -> Result<R, LinkError> {
        let raw = self.raw.lock().unwrap_or_else(|e| e.into_inner());
        raw.map(f).ok_or(LinkError::Aborted)
    }

    /// Ends the link: operations in flight on it return, and later uses fail.
    pub fn abort(&self) {
        let mut raw = self.raw.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = raw.take() {
            // SAFETY: the handle is live and, under the lock, used by no one else.
            let code = unsafe { sys::ncclCommAbort(c) };
            if code != sys::ncclResult_t::ncclSuccess {
                tracing::warn!(?code, "aborting an NCCL link");
            }
        }
    }
}

impl Drop for Comm {
    fn drop(&mut self) {
        self.abort();
    }
}

/// Enqueues point-to-point transfers on several links as one NCCL group, on `stream`. Each op
/// is (link, device pointer, bytes, send?): point-to-point moves bytes, whatever they hold. A
/// group that fails aborts its links.
///
/// # Safety
/// `stream` is a live stream of the links' device, and each pointer names a device buffer of at
/// least `bytes` bytes that stays alive, and is not written by anything else, until the stream
/// has passed the group.
pub unsafe fn group(
    stream: sys::cudaStream_t,
    ops: &[(&Comm, u64, usize, bool)],
) -> Result<(), LinkError> {
    let mut comms: Vec<&Comm> = Vec::new();
    for (c, ..) in ops {
        if !comms.iter().any(|k| std::ptr::eq(*k, *c)) {
            comms.push(c);
        }
    }
    // A non-blocking link may still be enqueueing its last group (its peer has to take part
    // before it can); that must be done before the next one starts.
    for c in &comms {
        c.wait_ready(ENQUEUE_TIMEOUT)?;
    }
    // Each link is locked once for the whole group, so no abort lands in the middle of it.
    let guards: Vec<_> = comms
        .iter()
        .map(|c| c.raw.lock().unwrap_or_else(|e| e.into_inner()))
        .collect();
    let mut raws = Vec::with_capacity(comms.len());
    for g in &guards {
        raws.push(g.ok_or(LinkError::Aborted)?);
    }
    // SAFETY: group calls have no arguments.
    check("starting a group", unsafe { sys::ncclGroupStart() })?;
    let mut first_error = None;
    for (comm, ptr, bytes, send) in ops {
        let at = comms
            .iter()
            .position(|k| std::ptr::eq(*k, *comm))
            .expect("collected above");
        let (raw, peer) = (raws[at], comm.peer_rank());
        let ty = sys::ncclDataType_t::ncclUint8;
        // SAFETY: the caller's promise.
        let code = unsafe {
            if *send {
                sys::ncclSend(*ptr as *const _, *bytes, ty, peer, raw, stream)
            } else {
                sys::ncclRecv(*ptr as *mut _, *bytes, ty, peer, raw, stream)
            }
        };
        if let Err(e) = check(if *send { "send" } else { "receive" }, code) {
            first_error.get_or_insert(e);
        }
    }
    // SAFETY: closes the group opened above.
    let end = check("ending a group", unsafe { sys::ncclGroupEnd() });
    drop(guards);
    // Enqueueing may go on in the background (until the peer posts its side): callers wait
    // for `Comm::wait_enqueued` before they queue work that must follow the transfers.
    let done = match first_error {
        Some(e) => Err(e),
        None => end.map(|_| ()),
    };
    // Part of the group may be queued, and nothing will ever pair with it.
    if done.is_err() {
        comms.iter().for_each(|c| c.abort());
    }
    done
}
