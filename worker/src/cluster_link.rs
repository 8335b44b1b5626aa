//! The engine's link to the rest of the pool: creditors it borrows from (two-phase: reserve,
//! then use), homes it lends to, and the wait for partial outputs inside a layer. Everything
//! arrives through the engine's one inbox, so while it waits for a creditor the engine still
//! answers homes that wait for it: two workers borrowing from each other never deadlock.
//!
//! A creditor that is lost (its connection broke, a send failed, or it did not answer within
//! `PEER_TIMEOUT`) is noted here; the engine then sends the requests with blocks there back to
//! its queue, to be recomputed from their token ids, so no request fails because of it. One
//! that takes its blocks back (it drains) is noted apart: the engine migrates those blocks.

use std::collections::{BTreeSet, HashMap};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use infinite_llm_protocol::gmanager::Creditor;
use prometheus_client::metrics::histogram::Histogram;

use crate::backend::nccl;
use crate::backend::{DeviceLink, LinkError};
use crate::creditor::{KvWork, PEER_TIMEOUT, attn_answer, serve_pool_request, take_back_loans};
use crate::dist_attention::{AttnCall, PartOut};
use crate::inbox::{Inbox, Submitted};
use crate::model::llama::{Exchange, Waited};
use crate::peer::tcp::TcpPeers;
use crate::peer::{Incoming, PeerMsg, Responder};
use crate::rmanager::{LoanKey, RManager};
use crate::scheduler::SeqId;

/// How long a home waits after a borrowing round fell short, in milliseconds.
const BORROW_RETRY_MS: std::ops::Range<u64> = 50..250;
/// A lost or unreachable creditor is not asked again for this long: long enough for the
/// gManager to expire a dead one (3 missed heartbeats) and for its advice to follow.
const SHUN: Duration = Duration::from_secs(10);

pub struct ClusterLink {
    pub peers: TcpPeers,
    /// Where to borrow, best first, as the gManager last advised.
    pub creditors: Arc<Mutex<Vec<Creditor>>>,
    next_call: u64,
    /// Blocks borrowed since start (a counter for metrics).
    pub borrow_total: u64,
    /// Reservations creditors refused since start (a counter for metrics).
    pub refusals_total: u64,
    remote_attention: Option<Histogram>,
    /// After a round that fell short: not before this instant, unless the advice changes.
    backoff: Option<(Instant, Vec<Creditor>)>,
    /// Creditors lost since the engine last recovered.
    troubled: BTreeSet<u16>,
    /// Creditors that asked for their blocks back since the engine last looked.
    reclaiming: BTreeSet<u16>,
    /// Requests whose loans a creditor called back (`Recall`), not yet yielded.
    recalled: Vec<SeqId>,
    /// Workers not to borrow from until the instant given.
    shunned: HashMap<String, Instant>,
    /// Creditor connections lost since start (a counter for metrics).
    pub losses_total: u64,
    /// Direct device links to creditors, by connection.
    links: HashMap<u16, LinkState>,
    /// Links homes offered, for the engine to join (it has the device).
    pub offers: Vec<(Vec<u8>, Responder)>,
}

/// A direct device link to a creditor, from the home's side.
enum LinkState {
    /// Offered at the instant given; not used until the creditor accepts and it is up.
    Offered(DeviceLink, Instant),
    Accepted(DeviceLink, Instant),
    Up(DeviceLink),
    /// Refused or broken: this connection keeps to TCP.
    None,
}

/// What one borrowing round gathered.
#[derive(Debug, Default)]
pub struct Round {
    /// Blocks reserved, by creditor.
    pub grants: Vec<(u16, Vec<u32>)>,
    /// Everything asked for was reserved.
    pub complete: bool,
}

impl ClusterLink {
    pub fn new(
        peers: TcpPeers,
        creditors: Arc<Mutex<Vec<Creditor>>>,
        remote_attention: Option<Histogram>,
    ) -> Self {
        Self {
            peers,
            creditors,
            next_call: 0,
            borrow_total: 0,
            refusals_total: 0,
            remote_attention,
            backoff: None,
            troubled: BTreeSet::new(),
            reclaiming: BTreeSet::new(),
            recalled: Vec::new(),
            shunned: HashMap::new(),
            losses_total: 0,
            links: HashMap::new(),
            offers: Vec::new(),
        }
    }

    /// Offers a direct device link to every creditor connection that has not had one offered,
    /// and moves those offered along (up, or given up);
    /// `offer` makes a link and its id (`None`: this device has no links).
    pub fn offer_links(
        &mut self,
        mut offer: impl FnMut() -> Option<Result<(DeviceLink, Vec<u8>), LinkError>>,
    ) {
        if !self.peers.direct_links {
            return;
        }
        let new: Vec<u16> = self
            .peers
            .live()
            .filter(|p| !self.links.contains_key(p))
            .collect();
        for peer in new {
            let state = match offer() {
                Some(Ok((link, id))) => match self.peers.send(peer, &PeerMsg::LinkOffer { id }) {
                    Ok(()) => {
                        tracing::info!(creditor = %self.peers.worker(peer), "offered a direct link (NCCL)");
                        LinkState::Offered(link, Instant::now())
                    }
                    Err(e) => {
                        self.lost(peer, &e.to_string());
                        LinkState::None
                    }
                },
                Some(Err(e)) => {
                    tracing::warn!(creditor = %self.peers.worker(peer), error = %e, "no direct link; attention goes over TCP");
                    LinkState::None
                }
                None => LinkState::None,
            };
            self.links.insert(peer, state);
        }
        let peers: Vec<u16> = self.links.keys().copied().collect();
        for peer in peers {
            self.direct_link(peer);
        }
    }

    /// Whether a direct link is offered or accepted but not up yet.
    pub fn links_pending(&self) -> bool {
        let pending = |s: &LinkState| matches!(s, LinkState::Offered(..) | LinkState::Accepted(..));
        self.links.values().any(pending)
    }

    /// Creditor connections whose direct link is up.
    pub fn direct_links_up(&self) -> usize {
        let up = |s: &&LinkState| matches!(s, LinkState::Up(_));
        self.links.values().filter(up).count()
    }

    /// The direct link to a creditor, once it is up; one that does not come up in time is
    /// given up (TCP then serves that creditor).
    pub fn direct_link(&mut self, peer: u16) -> Option<DeviceLink> {
        let state = self.links.get_mut(&peer)?;
        let (up, accepted, late) = match state {
            LinkState::Offered(link, since) => (link.comm.ready(), false, since.elapsed()),
            LinkState::Accepted(link, since) => (link.comm.ready(), true, since.elapsed()),
            LinkState::Up(_) | LinkState::None => (Ok(false), false, Duration::ZERO),
        };
        let worker = self.peers.worker(peer);
        if accepted && matches!(up, Ok(true)) {
            if let LinkState::Accepted(link, _) = std::mem::replace(state, LinkState::None) {
                tracing::info!(creditor = %worker, "direct link up (NCCL)");
                *state = LinkState::Up(link);
            }
        } else if up.is_err() || late > nccl::CONNECT_TIMEOUT {
            tracing::warn!(creditor = %worker, error = ?up.err(), "direct link did not come up; attention goes over TCP");
            if let LinkState::Offered(link, _) | LinkState::Accepted(link, _) =
                std::mem::replace(state, LinkState::None)
            {
                link.comm.abort();
            }
        }
        match state {
            LinkState::Up(link) => Some(link.clone()),
            _ => None,
        }
    }

    /// Declares a creditor lost: its connection is shut, its worker shunned for a while, and
    /// the requests with blocks there are the engine's to recover.
    pub fn lost(&mut self, peer: u16, why: &str) {
        if let Some(
            LinkState::Offered(link, _) | LinkState::Accepted(link, _) | LinkState::Up(link),
        ) = self.links.insert(peer, LinkState::None)
        {
            link.comm.abort();
        }
        if self.peers.lose(peer) {
            let worker = self.peers.worker(peer).to_owned();
            tracing::warn!(creditor = %worker, error = why, "creditor lost; the blocks held there will be recomputed");
            self.losses_total += 1;
            self.shunned.insert(worker, Instant::now() + SHUN);
        }
        self.troubled.insert(peer);
    }

    /// Takes what the engine must react to out of an inbox message: a lost creditor, a loan
    /// called back, or a creditor that takes its blocks back. Everything else is handed back.
    pub fn intercept(&mut self, m: Inbox) -> Option<Inbox> {
        match m {
            Inbox::Peer(Incoming::Lost { peer, error }) => self.lost(peer, &error),
            Inbox::Peer(Incoming::Request {
                msg: PeerMsg::LinkOffer { id },
                reply,
                ..
            }) => self.offers.push((id, reply)),
            Inbox::Peer(Incoming::Reply {
                peer,
                msg: PeerMsg::LinkAnswer { accepted, reason },
            }) => {
                let state = self.links.get_mut(&peer);
                if let Some(s @ LinkState::Offered(..)) = state {
                    let LinkState::Offered(link, since) = std::mem::replace(s, LinkState::None)
                    else {
                        unreachable!("matched above")
                    };
                    if accepted {
                        *s = LinkState::Accepted(link, since);
                    } else {
                        tracing::info!(creditor = %self.peers.worker(peer), %reason, "direct link refused; attention goes over TCP");
                        link.comm.abort();
                    }
                }
            }
            Inbox::Peer(Incoming::Reply {
                peer,
                msg: PeerMsg::Reclaim,
            }) => {
                let worker = self.peers.worker(peer).to_owned();
                tracing::info!(creditor = %worker, "creditor drains; moving the blocks held there");
                // Nothing new goes there while the old leaves.
                self.shunned.insert(worker, Instant::now() + SHUN);
                self.reclaiming.insert(peer);
            }
            Inbox::Peer(Incoming::Reply {
                msg: PeerMsg::Recall { seq },
                ..
            }) => self.recalled.push(seq),
            other => return Some(other),
        }
        None
    }

    /// Creditors lost since the last call.
    pub fn take_troubled(&mut self) -> Vec<u16> {
        std::mem::take(&mut self.troubled).into_iter().collect()
    }

    /// Creditors that asked for their blocks back since the last call.
    pub fn take_reclaiming(&mut self) -> Vec<u16> {
        std::mem::take(&mut self.reclaiming).into_iter().collect()
    }

    /// Requests whose loans creditors called back since the last call.
    pub fn take_recalled(&mut self) -> Vec<SeqId> {
        std::mem::take(&mut self.recalled)
    }

    /// Calls back the loans of newer requests (`RManager::recall_newer`) from their homes.
    pub fn recall(&self, loans: &[LoanKey]) {
        for (home, seq) in loans {
            self.peers.tell_home(home, &PeerMsg::Recall { seq: *seq });
        }
    }

    /// The advised creditors a migration may move blocks to, best first, other than `except`;
    /// connected on the way.
    pub fn destinations(&mut self, except: Option<u16>) -> Vec<u16> {
        let advice = self
            .creditors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        advice
            .iter()
            .filter_map(|c| self.connect(c))
            .filter(|&p| Some(p) != except)
            .collect()
    }

    /// The peer of an advised creditor, by worker id (a planned move's destination).
    pub fn advised_peer(&mut self, worker: &str) -> Option<u16> {
        let advised = self
            .creditors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|c| c.worker_id == worker)
            .cloned()?;
        self.connect(&advised)
    }

    fn connect(&mut self, c: &Creditor) -> Option<u16> {
        if self.is_shunned(&c.worker_id) {
            return None;
        }
        match self.peers.peer(&c.worker_id, &c.peer_addr) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!(error = %e, "creditor unreachable");
                self.shunned
                    .insert(c.worker_id.clone(), Instant::now() + SHUN);
                None
            }
        }
    }

    /// Reserves up to `n` blocks on `peer` for request `seq` (phase one of a migration);
    /// empty when it refuses or does not answer.
    pub fn reserve(
        &mut self,
        peer: u16,
        seq: SeqId,
        n: usize,
        inbox: &Receiver<Inbox>,
        serve: &mut dyn FnMut(Inbox),
    ) -> Vec<u32> {
        let call = self.call_id();
        let msg = PeerMsg::Reserve {
            call,
            seq,
            blocks: n as u32,
        };
        match self.call(peer, call, &msg, inbox, serve) {
            Some(PeerMsg::Reserved { blocks, .. }) => blocks,
            _ => Vec::new(),
        }
    }

    /// The K/V of one block a creditor holds for `seq`.
    pub fn fetch(
        &mut self,
        peer: u16,
        seq: SeqId,
        block: u32,
        inbox: &Receiver<Inbox>,
        serve: &mut dyn FnMut(Inbox),
    ) -> Option<Vec<f32>> {
        let call = self.call_id();
        let msg = PeerMsg::Fetch { call, seq, block };
        match self.call(peer, call, &msg, inbox, serve)? {
            PeerMsg::Fetched { data, .. } => Some(data),
            other => {
                tracing::warn!(seq, block, answer = ?std::mem::discriminant(&other), "fetch refused");
                None
            }
        }
    }

    /// Writes one block's K/V into a block `peer` reserved for `seq`; true once it is stored.
    pub fn store(
        &mut self,
        peer: u16,
        seq: SeqId,
        block: u32,
        data: Vec<f32>,
        inbox: &Receiver<Inbox>,
        serve: &mut dyn FnMut(Inbox),
    ) -> bool {
        let call = self.call_id();
        let msg = PeerMsg::Store {
            call,
            seq,
            block,
            data,
        };
        matches!(
            self.call(peer, call, &msg, inbox, serve),
            Some(PeerMsg::Stored { .. })
        )
    }

    /// Asks `peer` to do its side of a block move over the direct link, which the home has
    /// queued already (`Backend::link_move`): send `blocks` (`fetch`) or receive into them.
    /// True once its side is done. Any other answer leaves the home's side queued with nothing
    /// to pair with, so the creditor is then lost (its link aborted).
    pub fn move_blocks(
        &mut self,
        peer: u16,
        seq: SeqId,
        blocks: Vec<u32>,
        fetch: bool,
        inbox: &Receiver<Inbox>,
        serve: &mut dyn FnMut(Inbox),
    ) -> bool {
        let call = self.call_id();
        let msg = PeerMsg::MoveBlocks {
            call,
            seq,
            blocks,
            fetch,
        };
        match self.call(peer, call, &msg, inbox, serve) {
            Some(PeerMsg::Moved { .. }) => true,
            Some(PeerMsg::Failure { message, .. }) => {
                self.lost(peer, &format!("a block move failed: {message}"));
                false
            }
            Some(_) => {
                self.lost(peer, "a block move got a wrong answer");
                false
            }
            // Lost already.
            None => false,
        }
    }

    /// Tells a creditor that some blocks of `seq` are free again (moved elsewhere). Like
    /// `release`, one that cannot be told is dropped.
    pub fn release_blocks(&mut self, seq: SeqId, peer: u16, blocks: Vec<u32>) {
        if !self.peers.is_alive(peer) {
            return;
        }
        if let Err(e) = self
            .peers
            .send(peer, &PeerMsg::ReleaseBlocks { seq, blocks })
        {
            self.lost(peer, &e.to_string());
        }
    }

    /// Sends `msg` and waits for its answer; `None` if the peer was lost on the way.
    fn call(
        &mut self,
        peer: u16,
        call: u64,
        msg: &PeerMsg,
        inbox: &Receiver<Inbox>,
        serve: &mut dyn FnMut(Inbox),
    ) -> Option<PeerMsg> {
        if let Err(e) = self.peers.send(peer, msg) {
            self.lost(peer, &e.to_string());
            return None;
        }
        self.wait_for(inbox, peer, call, serve)
    }

    fn is_shunned(&mut self, worker: &str) -> bool {
        let now = Instant::now();
        self.shunned.retain(|_, until| *until > now);
        self.shunned.contains_key(worker)
    }

    fn call_id(&mut self) -> u64 {
        self.next_call += 1;
        self.next_call
    }

    /// Whether a borrowing round may start now: after a round that fell short the home waits
    /// a little, or until the gManager's advice changes, before asking the creditors again.
    pub fn may_borrow(&self) -> bool {
        match &self.backoff {
            None => true,
            Some((until, advice)) => {
                Instant::now() >= *until
                    || *advice != *self.creditors.lock().unwrap_or_else(|e| e.into_inner())
            }
        }
    }

    /// Whether an advised creditor serves no request of its own, as of its last heartbeat.
    pub fn any_idle_creditor(&self) -> bool {
        self.creditors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|c| c.running_requests == 0)
    }

    /// Whether creditor `peer` serves requests of its own, as of its last heartbeat (false
    /// when the advice no longer names it).
    pub fn is_busy(&self, peer: u16) -> bool {
        let worker = self.peers.worker(peer);
        self.creditors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|c| c.worker_id == worker && c.running_requests > 0)
    }

    /// Asks the advised creditors, best first (idle ones only unless `busy_too`), for up to
    /// `want` blocks for request `seq`; a creditor that refuses (full, or its lend cap
    /// reached) is passed over for the next one. `serve` handles whatever arrives meanwhile.
    pub fn borrow(
        &mut self,
        seq: SeqId,
        want: usize,
        busy_too: bool,
        inbox: &Receiver<Inbox>,
        serve: &mut dyn FnMut(Inbox),
    ) -> Round {
        let advice = self
            .creditors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut round = Round::default();
        let mut left = want;
        for c in &advice {
            if left == 0 {
                break;
            }
            if self.is_shunned(&c.worker_id) || !(busy_too || c.running_requests == 0) {
                continue;
            }
            let peer = match self.peers.peer(&c.worker_id, &c.peer_addr) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "creditor unreachable");
                    self.shunned
                        .insert(c.worker_id.clone(), Instant::now() + SHUN);
                    continue;
                }
            };
            let call = self.call_id();
            // The advice may be stale either way: ask for everything still missing, and the
            // creditor grants what it can.
            let msg = PeerMsg::Reserve {
                call,
                seq,
                blocks: left as u32,
            };
            if let Err(e) = self.peers.send(peer, &msg) {
                self.lost(peer, &e.to_string());
                continue;
            }
            match self.wait_for(inbox, peer, call, serve) {
                Some(PeerMsg::Reserved { blocks, .. }) if !blocks.is_empty() => {
                    left = left.saturating_sub(blocks.len());
                    tracing::debug!(seq, creditor = %c.worker_id, blocks = blocks.len(), "reserved");
                    round.grants.push((peer, blocks));
                }
                Some(PeerMsg::Reserved { refusal, .. }) => {
                    self.refusals_total += 1;
                    tracing::debug!(seq, creditor = %c.worker_id, %refusal, "creditor refused");
                }
                // It may hold a reservation all the same: dropping the connection frees it,
                // and the requests with blocks there are recovered.
                _ => self.lost(peer, "no answer to a reservation"),
            }
        }
        self.borrow_total += round
            .grants
            .iter()
            .map(|(_, b)| b.len() as u64)
            .sum::<u64>();
        round.complete = left == 0;
        if round.complete {
            self.backoff = None;
        } else {
            // Randomized, so two homes that each wait for what the other holds do not retry
            // in lockstep.
            let wait = Duration::from_millis(rand::random_range(BORROW_RETRY_MS));
            self.backoff = Some((Instant::now() + wait, advice));
        }
        round
    }

    /// Tells a creditor that a request's blocks are free again. A lost one freed them when
    /// the connection dropped; one that cannot be told is dropped (a half-written frame
    /// would garble the connection), which frees them too.
    pub fn release(&mut self, seq: SeqId, peer: u16) {
        if !self.peers.is_alive(peer) {
            return;
        }
        if let Err(e) = self.peers.send(peer, &PeerMsg::Release { seq }) {
            self.lost(peer, &e.to_string());
        }
    }

    /// Waits for the answer to `call` from `peer`, handing everything else to `serve`.
    fn wait_for(
        &mut self,
        inbox: &Receiver<Inbox>,
        peer: u16,
        call: u64,
        serve: &mut dyn FnMut(Inbox),
    ) -> Option<PeerMsg> {
        let deadline = Instant::now() + PEER_TIMEOUT;
        loop {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                self.lost(peer, &format!("no answer within {PEER_TIMEOUT:?}"));
                return None;
            };
            match inbox.recv_timeout(left) {
                Ok(Inbox::Peer(Incoming::Reply { peer: p, msg }))
                    if p == peer && reply_call(&msg) == Some(call) =>
                {
                    return Some(msg);
                }
                Ok(m) => {
                    if let Some(other) = self.intercept(m) {
                        serve(other);
                    } else if !self.peers.is_alive(peer) {
                        return None;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return None,
            }
        }
    }
}

fn reply_call(msg: &PeerMsg) -> Option<u64> {
    match msg {
        PeerMsg::Reserved { call, .. }
        | PeerMsg::AttnOut { call, .. }
        | PeerMsg::Failure { call, .. }
        | PeerMsg::Fetched { call, .. }
        | PeerMsg::Stored { call, .. }
        | PeerMsg::Moved { call } => Some(*call),
        _ => None,
    }
}

/// The `Exchange` of one forward pass: sends each layer's calls and collects the partials.
pub struct LayerExchange<'a> {
    pub link: &'a mut ClusterLink,
    pub inbox: &'a Receiver<Inbox>,
    pub rm: &'a mut RManager,
    /// Requests submitted while the step ran, admitted after it.
    pub stash: &'a mut Vec<Submitted>,
    /// Block copies asked for while the step ran (the cache is the step's until it ends).
    pub deferred: &'a mut Vec<KvWork>,
    outstanding: HashMap<u64, u16>,
    done: Vec<(u16, Vec<PartOut>)>,
    failed: Option<String>,
}

impl<'a> LayerExchange<'a> {
    pub fn new(
        link: &'a mut ClusterLink,
        inbox: &'a Receiver<Inbox>,
        rm: &'a mut RManager,
        stash: &'a mut Vec<Submitted>,
        deferred: &'a mut Vec<KvWork>,
    ) -> Self {
        Self {
            link,
            inbox,
            rm,
            stash,
            deferred,
            outstanding: HashMap::new(),
            done: Vec::new(),
            failed: None,
        }
    }
}

impl Exchange for LayerExchange<'_> {
    fn link(&mut self, peer: u16) -> Option<DeviceLink> {
        self.link.direct_link(peer)
    }

    fn link_failed(&mut self, peer: u16, why: &str) {
        self.link.lost(peer, why);
    }

    fn send(&mut self, calls: Vec<(u16, AttnCall)>) {
        for (peer, attn) in calls {
            let call = self.link.call_id();
            match self.link.peers.send(peer, &PeerMsg::Attn { call, attn }) {
                Ok(()) => {
                    self.outstanding.insert(call, peer);
                }
                Err(e) => {
                    self.link.lost(peer, &e.to_string());
                    self.failed = Some(e.to_string());
                }
            }
        }
    }

    fn wait(&mut self) -> Waited {
        self.wait_for(&mut || Ok(true))
    }

    fn poll(&mut self) -> Waited {
        while let Ok(m) = self.inbox.try_recv() {
            if let Some(serve) = self.take(m) {
                return serve;
            }
        }
        Waited::Done(Vec::new())
    }

    fn settle(&mut self, done: &mut dyn FnMut() -> Result<bool, String>) -> Waited {
        self.wait_for(done)
    }
}

impl LayerExchange<'_> {
    /// Waits for every answer and then for `done`, within the peer timeout, handing back the
    /// other homes' calls that come meanwhile.
    fn wait_for(&mut self, done: &mut dyn FnMut() -> Result<bool, String>) -> Waited {
        let started = Instant::now();
        let deadline = started + PEER_TIMEOUT;
        loop {
            if let Some(e) = self.failed.take() {
                self.outstanding.clear();
                return Waited::Failed(e);
            }
            if self.outstanding.is_empty() {
                match done() {
                    Ok(true) => {
                        if let Some(h) = &self.link.remote_attention {
                            h.observe(started.elapsed().as_secs_f64());
                        }
                        return Waited::Done(std::mem::take(&mut self.done));
                    }
                    Ok(false) => {}
                    Err(e) => {
                        self.failed = Some(e);
                        continue;
                    }
                }
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                let silent: BTreeSet<u16> = self.outstanding.values().copied().collect();
                for &peer in &silent {
                    self.link
                        .lost(peer, &format!("no answer within {PEER_TIMEOUT:?}"));
                }
                self.failed = Some(if silent.is_empty() {
                    format!("the step's transfers did not finish within {PEER_TIMEOUT:?}")
                } else {
                    format!(
                        "{} creditors did not answer within {PEER_TIMEOUT:?}",
                        silent.len()
                    )
                });
                continue;
            };
            let m = if self.outstanding.is_empty() {
                // Only the device is awaited now: it is looked at again at once.
                match self.inbox.try_recv() {
                    Ok(m) => m,
                    Err(_) => {
                        std::thread::yield_now();
                        continue;
                    }
                }
            } else {
                match self.inbox.recv_timeout(left) {
                    Ok(m) => m,
                    Err(_) => continue,
                }
            };
            if let Some(serve) = self.take(m) {
                return serve;
            }
        }
    }

    /// Handles one message that arrived during the step: replies to this step's calls are
    /// kept, other homes' requests are answered (an attention call is returned, to be served
    /// with the cache) or deferred, requests submitted are stashed.
    fn take(&mut self, m: Inbox) -> Option<Waited> {
        let Some(m) = self.link.intercept(m) else {
            let lost = self
                .outstanding
                .values()
                .find(|&&p| !self.link.peers.is_alive(p));
            if let Some(&peer) = lost {
                self.failed = Some(format!("creditor {} lost", self.link.peers.worker(peer)));
            }
            return None;
        };
        match m {
            Inbox::Submit(s) => self.stash.push(s),
            // The engine looks at the drain flag between steps.
            Inbox::Drain => {}
            Inbox::Peer(Incoming::Reply {
                msg: PeerMsg::AttnOut { call, parts },
                ..
            }) => {
                if let Some(peer) = self.outstanding.remove(&call) {
                    self.done.push((peer, parts));
                }
            }
            // A creditor that no longer holds the blocks it lent is as good as lost.
            Inbox::Peer(Incoming::Reply {
                peer,
                msg: PeerMsg::Failure { call, message },
            }) => {
                if self.outstanding.remove(&call).is_some() {
                    self.link.lost(peer, &message);
                    self.failed = Some(message);
                }
            }
            Inbox::Peer(Incoming::Reply { .. } | Incoming::Lost { .. }) => {}
            Inbox::Peer(Incoming::Gone { from }) => take_back_loans(self.rm, &from),
            Inbox::Peer(Incoming::Request { from, msg, reply }) => {
                match serve_pool_request(self.rm, from, msg, reply) {
                    Some(KvWork::Attn { call, attn, reply }) => {
                        let link = reply.link();
                        return Some(Waited::Serve(
                            attn,
                            link,
                            Box::new(move |answer| reply.send(&attn_answer(call, answer))),
                        ));
                    }
                    Some(copy) => self.deferred.push(copy),
                    None => {}
                }
            }
        }
        None
    }
}
