//! The engine thread's one queue: new requests from the HTTP side, and whatever peers send
//! (homes asking this worker as a creditor, creditors answering it as a home).

use tokio::sync::mpsc;

use crate::peer::Incoming;
use crate::request::{Event, GenerateRequest};
use crate::scheduler::SeqId;

/// A request handed to the engine, with the channel its events go back on.
pub(crate) struct Submitted {
    pub(crate) id: SeqId,
    pub(crate) req: GenerateRequest,
    pub(crate) tx: mpsc::UnboundedSender<Event>,
}

/// Everything the engine thread reacts to, in one queue.
pub(crate) enum Inbox {
    Submit(Submitted),
    Peer(Incoming),
    /// Wakes the engine to look at the drain flag.
    Drain,
}
