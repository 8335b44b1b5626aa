//! The peer transport between workers: what travels (`wire`) and how (`tcp`; NCCL between GPUs
//! comes later behind the same `Incoming`/`send` shape).

pub mod tcp;
pub mod wire;

use std::net::TcpStream;
use std::sync::{Arc, Mutex};

pub use wire::PeerMsg;

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

/// The way back to the home that sent a request.
#[derive(Debug, Clone)]
pub struct Responder {
    stream: Arc<Mutex<TcpStream>>,
}

impl Responder {
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
