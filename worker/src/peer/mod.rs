//! The peer transport between workers: what travels (`wire`) and how (`tcp`). Between GPUs the
//! connection also sets up a direct device link (NCCL, `backend::nccl`), which then carries
//! attention's rows and partials while the connection carries the calls.

pub mod frame_checks;
#[cfg(test)]
mod fuzz_tests;
pub mod tcp;
pub mod wire;

use std::net::TcpStream;
use std::sync::{Arc, Mutex};

pub use wire::PeerMsg;

use frame_checks::Rejects;

use crate::backend::DeviceLink;

/// How attention's rows and partials travel between workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Transport {
    /// Over direct device links (NCCL) where both workers have a GPU, TCP otherwise.
    #[default]
    Auto,
    /// Always over the peer connection (TCP).
    Tcp,
    /// Over NCCL; a worker that cannot (no GPU, no libnccl) refuses to start.
    Nccl,
}

/// Something that arrived from another worker, for the engine thread to act on.
#[derive(Debug)]
pub enum Incoming {
    /// A home asks this worker, as a creditor.
    Request {
        from: String,
        msg: PeerMsg,
        reply: Responder,
    },
    /// A creditor answers a call this worker made.
    Reply { peer: u16, msg: PeerMsg },
    /// The connection to a creditor broke: calls in flight to it will not be answered.
    Lost { peer: u16, error: String },
    /// A home's connection closed (it left or died): what it borrowed here comes back.
    Gone { from: String },
}

/// The way back to the home that sent a request, and the direct device link to it, if any.
#[derive(Debug, Clone)]
pub struct Responder {
    stream: Arc<Mutex<TcpStream>>,
    link: Arc<Mutex<Option<DeviceLink>>>,
    rejects: Rejects,
}

impl Responder {
    pub(crate) fn new(stream: TcpStream) -> Self {
        Self {
            stream: Arc::new(Mutex::new(stream)),
            link: Arc::default(),
            rejects: Rejects::default(),
        }
    }

    /// Counts the frames it refuses in `rejects`.
    pub(crate) fn with_rejects(mut self, rejects: Rejects) -> Self {
        self.rejects = rejects;
        self
    }

    /// Answers a refused frame with `Failure` and counts it under `reason`.
    pub fn refuse(&self, call: u64, message: String, reason: &'static str) {
        self.rejects.count(reason);
        self.send(&PeerMsg::Failure { call, message });
    }

    /// The direct device link to this home, once one was accepted.
    pub fn link(&self) -> Option<DeviceLink> {
        self.link.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set_link(&self, link: DeviceLink) {
        *self.link.lock().unwrap_or_else(|e| e.into_inner()) = Some(link);
    }

    /// Ends the direct link (the home went away): transfers stuck on it return.
    fn abort_link(&self) {
        if let Some(l) = self.link.lock().unwrap_or_else(|e| e.into_inner()).take() {
            l.comm.abort();
        }
    }

    /// Sends the answer; a home that went away is not this worker's problem, so errors are
    /// logged and dropped.
    pub fn send(&self, msg: &PeerMsg) {
        let mut s = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = msg.write_to(&mut *s) {
            tracing::debug!(error = %e, "could not answer a peer");
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("connecting to peer {worker} at {addr}: {source}")]
    Connect {
        worker: String,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("sending to peer {worker}: {source}")]
    Send {
        worker: String,
        #[source]
        source: std::io::Error,
    },
}
