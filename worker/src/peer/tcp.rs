//! Peer transport over TCP: one listener for homes that borrow from this worker, one connection
//! per creditor this worker borrows from. Blocking sockets on plain threads: the engine thread
//! never awaits, it reads everything from one inbox.
//!
//! No call waits forever on a dead peer: connects and writes time out, and a connection the
//! engine declares lost is shut down, which also ends its reader thread. A lost connection is
//! never reused: talking to that worker again opens a new one under a new index, so blocks
//! held under the old index can never be mistaken for blocks of the new connection.

use std::collections::HashMap;
use std::io::BufReader;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{Incoming, PeerError, PeerMsg, Responder};

/// Where incoming messages go (the engine's inbox).
pub type Sink = Arc<dyn Fn(Incoming) + Send + Sync>;

/// A silent peer is declared lost after this long on a connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A write that cannot go out for this long (the peer stopped reading) fails.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

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
    token: String,
    conns: Vec<Conn>,
    sink: Sink,
    homes: Homes,
}

impl TcpPeers {
    /// Listens for homes on `addr` and returns the transport with the address it bound.
    pub fn listen(
        addr: SocketAddr,
        me: String,
        token: String,
        sink: Sink,
        direct_links: bool,
    ) -> std::io::Result<(Self, SocketAddr)> {
        let listener = TcpListener::bind(addr)?;
        let bound = listener.local_addr()?;
        let homes = Homes::default();
        let (tok, s, h) = (token.clone(), sink.clone(), homes.clone());
        std::thread::Builder::new()
            .name("peer-accept".into())
            .spawn(move || accept_loop(listener, tok, s, h, direct_links))?;
        Ok((
            Self {
                direct_links,
                me,
                token,
                conns: Vec::new(),
                sink,
                homes,
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
            home: self.me.clone(),
            token: self.token.clone(),
        }
        .write_to(&mut w)
        .map_err(connect_err)?;
        let peer = self.conns.len() as u16;
        // Buffered: a frame's length and body then come in one read, not two.
        let mut r = BufReader::new(stream.try_clone().map_err(connect_err)?);
        let sink = self.sink.clone();
        std::thread::Builder::new()
            .name(format!("peer-{peer}"))
            .spawn(move || {
                loop {
                    match PeerMsg::read_from(&mut r) {
                        Ok(msg) => sink(Incoming::Reply { peer, msg }),
                        Err(e) => {
                            sink(Incoming::Lost {
                                peer,
                                error: e.to_string(),
                            });
                            return;
                        }
                    }
                }
            })
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

fn accept_loop(listener: TcpListener, token: String, sink: Sink, homes: Homes, direct_links: bool) {
    for (conn, stream) in listener.incoming().enumerate() {
        let Ok(stream) = stream else { continue };
        let (token, sink, homes) = (token.clone(), sink.clone(), homes.clone());
        let _ = std::thread::Builder::new()
            .name("peer-home".into())
            .spawn(move || serve_home(stream, &token, sink, conn, homes, direct_links));
    }
}

/// Reads one home's requests until it hangs up, then reports it gone. The first frame must
/// carry the cluster token.
fn serve_home(
    stream: TcpStream,
    token: &str,
    sink: Sink,
    conn: usize,
    homes: Homes,
    direct_links: bool,
) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let Ok(w) = stream.try_clone() else { return };
    let mut r = BufReader::new(stream);
    let home = match PeerMsg::read_from(&mut r) {
        Ok(PeerMsg::Hello { home, token: t })
            if constant_time_eq(t.as_bytes(), token.as_bytes()) =>
        {
            home
        }
        _ => {
            tracing::warn!(peer = ?w.peer_addr().ok(), "peer refused: no valid cluster token");
            return;
        }
    };
    let reply = Responder::new(w);
    tracing::info!(home = %home, "a home connected");
    // Loans are held per connection: a home that reconnects (say, restarted under the same
    // name) never has its new loans taken back with the old connection's.
    let from = format!("{home}#{conn}");
    let lock = || homes.lock().unwrap_or_else(|e| e.into_inner());
    lock().insert(from.clone(), reply.clone());
    while let Ok(msg) = PeerMsg::read_from(&mut r) {
        if matches!(msg, PeerMsg::LinkOffer { .. }) && !direct_links {
            reply.send(&PeerMsg::LinkAnswer {
                accepted: false,
                reason: "this worker uses TCP only".into(),
            });
            continue;
        }
        sink(Incoming::Request {
            from: from.clone(),
            msg,
            reply: reply.clone(),
        });
    }
    tracing::info!(home = %home, "a home disconnected");
    // Before the engine hears of it: a transfer it waits on must not wait for a dead home.
    reply.abort_link();
    lock().remove(&from);
    sink(Incoming::Gone { from });
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
