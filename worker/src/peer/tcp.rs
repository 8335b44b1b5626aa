//! Peer transport over TCP: one listener for homes that borrow from this worker, one connection
//! per creditor this worker borrows from. Blocking sockets on plain threads: the engine thread
//! never awaits, it reads everything from one inbox.
//!
//! No call waits forever on a dead peer: connects and writes time out, and a connection the
//! engine declares lost is shut down, which also ends its reader thread. A lost connection is
//! never reused: talking to that worker again opens a new one under a new index, so blocks
//! held under the old index can never be mistaken for blocks of the new connection.
//!
//! Before its `Hello` is checked, a connection may send one small frame within a deadline, and
//! only a few such connections are served at once; after it, frames are bounded by what the
//! cache's geometry allows, and each is checked (`frame_checks`) before the engine sees it.

use std::collections::HashMap;
use std::io::BufReader;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use infinite_llm_protocol::secret::Secret;

use super::frame_checks::{FrameLimits, Rejects};
use super::wire::{CONNECTION_CALL, FrameTooLarge, PROTOCOL_VERSION};
use super::{Incoming, PeerError, PeerMsg, Responder};

/// Where incoming messages go (the engine's inbox).
pub type Sink = Arc<dyn Fn(Incoming) + Send + Sync>;

/// A silent peer is declared lost after this long on a connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A write that cannot go out for this long (the peer stopped reading) fails.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection must have sent its `Hello` within this long.
const HELLO_DEADLINE: Duration = Duration::from_secs(5);
/// Largest `Hello`: a worker id and a token fit many times over.
const HELLO_MAX_FRAME: usize = 4 << 10;
/// Connections served at once before their `Hello` is checked; more are closed at once.
const MAX_UNAUTHENTICATED: usize = 16;

/// What every connection is checked against, and where refusals are counted.
#[derive(Clone)]
pub struct Guard {
    pub limits: FrameLimits,
    pub rejects: Rejects,
}

struct Conn {
    worker: String,
    addr: String,
    stream: Arc<Mutex<TcpStream>>,
    alive: bool,
}

/// The way back to each home connected here, by its loan key prefix (`home#conn`).
type Homes = Arc<Mutex<HashMap<String, Responder>>>;

pub struct TcpPeers {
    /// Whether attention may move over direct device links (NCCL) with peers that can.
    pub direct_links: bool,
    me: String,
    token: Secret,
    conns: Vec<Conn>,
    sink: Sink,
    homes: Homes,
    guard: Guard,
}

impl TcpPeers {
    /// Listens for homes on `addr` and returns the transport with the address it bound.
    pub fn listen(
        addr: SocketAddr,
        me: String,
        token: Secret,
        sink: Sink,
        direct_links: bool,
        guard: Guard,
    ) -> std::io::Result<(Self, SocketAddr)> {
        let listener = TcpListener::bind(addr)?;
        let bound = listener.local_addr()?;
        let homes = Homes::default();
        let home_side = HomeSide {
            token: token.clone(),
            sink: sink.clone(),
            homes: homes.clone(),
            direct_links,
            guard: guard.clone(),
            unauthenticated: Arc::default(),
        };
        std::thread::Builder::new()
            .name("peer-accept".into())
            .spawn(move || accept_loop(listener, home_side))?;
        Ok((
            Self {
                direct_links,
                me,
                token,
                conns: Vec::new(),
                sink,
                homes,
                guard,
            },
            bound,
        ))
    }

    /// The index of a creditor, connecting to it when no live connection exists.
    pub fn peer(&mut self, worker: &str, addr: &str) -> Result<u16, PeerError> {
        if let Some(i) = self
            .conns
            .iter()
            .position(|c| c.alive && c.worker == worker && c.addr == addr)
        {
            return Ok(i as u16);
        }
        let connect_err = |source| PeerError::Connect {
            worker: worker.to_string(),
            addr: addr.to_string(),
            source,
        };
        let sock: SocketAddr = addr
            .parse()
            .map_err(|e| connect_err(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
        let stream = TcpStream::connect_timeout(&sock, CONNECT_TIMEOUT).map_err(connect_err)?;
        stream.set_nodelay(true).map_err(connect_err)?;
        stream
            .set_write_timeout(Some(WRITE_TIMEOUT))
            .map_err(connect_err)?;
        let mut w = stream.try_clone().map_err(connect_err)?;
        PeerMsg::Hello {
            version: PROTOCOL_VERSION,
            home: self.me.clone(),
            token: self.token.clone(),
        }
        .write_to(&mut w)
        .map_err(connect_err)?;
        let peer = self.conns.len() as u16;
        // Buffered: a frame's length and body then come in one read, not two.
        let mut r = BufReader::new(stream.try_clone().map_err(connect_err)?);
        let (sink, guard) = (self.sink.clone(), self.guard.clone());
        std::thread::Builder::new()
            .name(format!("peer-{peer}"))
            .spawn(move || read_creditor(&mut r, peer, &sink, &guard))
            .map_err(connect_err)?;
        self.conns.push(Conn {
            worker: worker.to_string(),
            addr: addr.to_string(),
            stream: Arc::new(Mutex::new(w)),
            alive: true,
        });
        Ok(peer)
    }

    /// Indices of the live connections to creditors.
    pub fn live(&self) -> impl Iterator<Item = u16> + '_ {
        (0..self.conns.len() as u16).filter(|&p| self.is_alive(p))
    }

    pub fn worker(&self, peer: u16) -> &str {
        &self.conns[peer as usize].worker
    }

    pub fn is_alive(&self, peer: u16) -> bool {
        self.conns[peer as usize].alive
    }

    /// Declares the connection to a creditor lost and shuts it down; returns whether it was
    /// alive until now.
    pub fn lose(&mut self, peer: u16) -> bool {
        let c = &mut self.conns[peer as usize];
        let was = std::mem::replace(&mut c.alive, false);
        if was {
            let s = c.stream.lock().unwrap_or_else(|e| e.into_inner());
            let _ = s.shutdown(Shutdown::Both);
        }
        was
    }

    /// Sends `msg` to a home connected here (by the key its loans are held under); a home
    /// that went away is skipped, its loans come back when its connection closes.
    pub fn tell_home(&self, from: &str, msg: &PeerMsg) {
        let reply = self
            .homes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(from)
            .cloned();
        if let Some(r) = reply {
            r.send(msg);
        }
    }

    pub fn send(&self, peer: u16, msg: &PeerMsg) -> Result<(), PeerError> {
        let c = &self.conns[peer as usize];
        if !c.alive {
            return Err(PeerError::Send {
                worker: c.worker.clone(),
                source: std::io::ErrorKind::NotConnected.into(),
            });
        }
        let mut s = c.stream.lock().unwrap_or_else(|e| e.into_inner());
        msg.write_to(&mut *s).map_err(|source| PeerError::Send {
            worker: c.worker.clone(),
            source,
        })
    }
}

/// Reads a creditor's answers until the connection ends or sends what no creditor may:
/// then the engine hears the connection is lost.
fn read_creditor(r: &mut BufReader<TcpStream>, peer: u16, sink: &Sink, guard: &Guard) {
    let max = guard.limits.max_frame();
    let error = loop {
        let msg = match PeerMsg::read_capped(r, max) {
            Ok(msg) => msg,
            Err(e) => break e.to_string(),
        };
        if let Err(e) = guard.limits.check_reply(&msg) {
            guard.rejects.count(e.reason);
            break format!("the creditor sent a bad frame: {e}");
        }
        match msg {
            PeerMsg::Failure { call, message } if call == CONNECTION_CALL => break message,
            msg => sink(Incoming::Reply { peer, msg }),
        }
    };
    let _ = r.get_ref().shutdown(Shutdown::Both);
    sink(Incoming::Lost { peer, error });
}

/// What serving the homes that connect here takes.
#[derive(Clone)]
struct HomeSide {
    token: Secret,
    sink: Sink,
    homes: Homes,
    direct_links: bool,
    guard: Guard,
    /// Connections whose `Hello` has not been checked yet.
    unauthenticated: Arc<AtomicUsize>,
}

fn accept_loop(listener: TcpListener, side: HomeSide) {
    for (conn, stream) in listener.incoming().enumerate() {
        let Ok(stream) = stream else { continue };
        let pending = Pending::enter(&side.unauthenticated);
        if pending.is_none() {
            side.guard.rejects.count("busy");
            tracing::warn!(peer = ?stream.peer_addr().ok(), "peer refused: too many connections not yet authenticated");
            continue;
        }
        let side = side.clone();
        let _ = std::thread::Builder::new()
            .name("peer-home".into())
            .spawn(move || serve_home(stream, &side, conn, pending));
    }
}

/// One connection not yet authenticated, counted while it lives.
struct Pending(Arc<AtomicUsize>);

impl Pending {
    fn enter(count: &Arc<AtomicUsize>) -> Option<Self> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_UNAUTHENTICATED).then_some(n + 1)
            })
            .ok()
            .map(|_| Pending(count.clone()))
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The home a connection's first frame names, once its token and version are right.
fn authenticate(
    r: &mut BufReader<TcpStream>,
    side: &HomeSide,
    reply: &Responder,
) -> Result<String, &'static str> {
    let hello = PeerMsg::read_capped(r, HELLO_MAX_FRAME).map_err(|e| {
        use std::io::ErrorKind::{TimedOut, WouldBlock};
        match e.kind() {
            TimedOut | WouldBlock => "hello_timeout",
            _ if e.get_ref().is_some_and(|i| i.is::<FrameTooLarge>()) => "too_large",
            _ => "malformed",
        }
    })?;
    let PeerMsg::Hello {
        version,
        home,
        token,
    } = hello
    else {
        return Err("before_hello");
    };
    if !side.token.matches(token.expose()) {
        return Err("unauthenticated");
    }
    if version != PROTOCOL_VERSION {
        let message = format!(
            "peer protocol version mismatch: this worker speaks version {PROTOCOL_VERSION}, home {home} version {version}"
        );
        tracing::warn!("{message}");
        reply.send(&PeerMsg::Failure {
            call: CONNECTION_CALL,
            message,
        });
        return Err("version");
    }
    Ok(home)
}

/// Reads one home's requests until it hangs up, then reports it gone. The first frame must
/// carry the cluster token and this protocol's version.
fn serve_home(stream: TcpStream, side: &HomeSide, conn: usize, pending: Option<Pending>) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let _ = stream.set_read_timeout(Some(HELLO_DEADLINE));
    let Ok(w) = stream.try_clone() else { return };
    let peer_addr = w.peer_addr().ok();
    let reply = Responder::new(w).with_rejects(side.guard.rejects.clone());
    let mut r = BufReader::new(stream);
    let home = match authenticate(&mut r, side, &reply) {
        Ok(home) => home,
        Err(reason) => {
            side.guard.rejects.count(reason);
            tracing::warn!(peer = ?peer_addr, reason, "peer refused before its Hello was accepted");
            let _ = r.get_ref().shutdown(Shutdown::Both);
            return;
        }
    };
    drop(pending);
    let _ = r.get_ref().set_read_timeout(None);
    tracing::info!(home = %home, "a home connected");
    // Loans are held per connection: a home that reconnects (say, restarted under the same
    // name) never has its new loans taken back with the old connection's.
    let from = format!("{home}#{conn}");
    let lock = || side.homes.lock().unwrap_or_else(|e| e.into_inner());
    lock().insert(from.clone(), reply.clone());
    let max = side.guard.limits.max_frame();
    loop {
        let msg = match PeerMsg::read_capped(&mut r, max) {
            Ok(msg) => msg,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                let reason = if e.get_ref().is_some_and(|i| i.is::<FrameTooLarge>()) {
                    "too_large"
                } else {
                    "malformed"
                };
                reply.refuse(CONNECTION_CALL, e.to_string(), reason);
                break;
            }
            Err(_) => break,
        };
        if let Err(e) = side.guard.limits.check_request(&msg) {
            tracing::warn!(home = %home, error = %e, "bad frame refused");
            reply.refuse(
                msg.call().unwrap_or(CONNECTION_CALL),
                e.to_string(),
                e.reason,
            );
            continue;
        }
        if matches!(msg, PeerMsg::LinkOffer { .. }) && !side.direct_links {
            reply.send(&PeerMsg::LinkAnswer {
                accepted: false,
                reason: "this worker uses TCP only".into(),
            });
            continue;
        }
        (side.sink)(Incoming::Request {
            from: from.clone(),
            msg,
            reply: reply.clone(),
        });
    }
    tracing::info!(home = %home, "a home disconnected");
    let _ = r.get_ref().shutdown(Shutdown::Both);
    // Before the engine hears of it: a transfer it waits on must not wait for a dead home.
    reply.abort_link();
    lock().remove(&from);
    (side.sink)(Incoming::Gone { from });
}
