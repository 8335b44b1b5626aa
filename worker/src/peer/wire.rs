//! The binary frames workers exchange: a little-endian `u32` length, a tag byte, then the body.
//! No JSON on the per-layer path: queries and partial outputs travel as raw `f32` arrays.

use std::io::{self, Read, Write};

use infinite_llm_protocol::secret::Secret;

use crate::backend::KvSegment;
use crate::dist_attention::{Append, AttnCall, PartIn, PartOut};

/// The version of this protocol, carried in `Hello`. Workers of two versions (a rolling update
/// half done) refuse each other by name rather than misreading each other's frames. Version 1
/// had no version field (its `Hello` is still recognised, to name it).
pub const PROTOCOL_VERSION: u32 = 2;

/// The `call` of a `Failure` about the connection itself rather than one call (a refused
/// `Hello`, a frame that named no call).
pub const CONNECTION_CALL: u64 = u64::MAX;

/// Tags of the two `Hello` layouts: version 1's (no version field) and the current one.
const TAG_HELLO_V1: u8 = 1;
const TAG_HELLO: u8 = 16;

#[derive(Debug, Clone, PartialEq)]
pub enum PeerMsg {
    /// First frame of a connection: the protocol version, who the home is, and the cluster
    /// token (`Debug` shows it redacted).
    Hello {
        version: u32,
        home: String,
        token: Secret,
    },
    /// Two-phase borrowing, phase one: reserve up to `blocks` for the home's request `seq`
    /// (the creditor grants what it can lend; the home gives back a round that falls short).
    Reserve {
        call: u64,
        seq: u64,
        blocks: u32,
    },
    /// The reserved block ids (empty when refused, with the reason).
    Reserved {
        call: u64,
        blocks: Vec<u32>,
        refusal: String,
    },
    /// The request ended or was preempted: its blocks go back to the creditor's pool.
    Release {
        seq: u64,
    },
    Attn {
        call: u64,
        attn: AttnCall,
    },
    AttnOut {
        call: u64,
        parts: Vec<PartOut>,
    },
    Failure {
        call: u64,
        message: String,
    },
    /// From a creditor that drains: take back everything this worker holds here (the home
    /// migrates those blocks elsewhere, recomputing only what finds no room, and releases them).
    Reclaim,
    /// From a creditor at its lend cap that an older request of another home asks to lend:
    /// request `seq` of this worker yields what it holds (wound-wait, so that the oldest
    /// request in the pool always progresses) and is recomputed later.
    Recall {
        seq: u64,
    },
    /// From a home with a GPU, right after `Hello`: join a direct link (NCCL) as rank 1 with
    /// this unique id; attention calls may then move their rows over it.
    LinkOffer {
        id: Vec<u8>,
    },
    /// The creditor's answer to `LinkOffer` (refused: no GPU, no NCCL, or TCP forced).
    LinkAnswer {
        accepted: bool,
        reason: String,
    },
    /// Migration: the K and V of every layer of one block lent for the home's request `seq`.
    Fetch {
        call: u64,
        seq: u64,
        block: u32,
    },
    /// The fetched block, as `Backend::kv_read_block` lays it out.
    Fetched {
        call: u64,
        data: Vec<f32>,
    },
    /// Migration: write a block's K and V (all layers) into block `block` reserved for `seq`.
    Store {
        call: u64,
        seq: u64,
        block: u32,
        data: Vec<f32>,
    },
    /// The store landed; the home may now point its block table at it.
    Stored {
        call: u64,
    },
    /// Some of the blocks lent for `seq` are free again (their content moved elsewhere).
    ReleaseBlocks {
        seq: u64,
        blocks: Vec<u32>,
    },
    /// Migration over the direct link: the K and V of every layer of `blocks`, lent for `seq`,
    /// go to the home (`fetch`) or arrive from it, in this order; the home has queued its side.
    MoveBlocks {
        call: u64,
        seq: u64,
        blocks: Vec<u32>,
        fetch: bool,
    },
    /// The creditor's side of a `MoveBlocks` is done.
    Moved {
        call: u64,
    },
}

#[derive(Default)]
struct Enc(Vec<u8>);

impl Enc {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn len(&mut self, n: usize) {
        self.u32(n as u32);
    }
    fn str(&mut self, s: &str) {
        self.len(s.len());
        self.0.extend_from_slice(s.as_bytes());
    }
    fn u32s(&mut self, v: &[u32]) {
        self.len(v.len());
        v.iter().for_each(|x| self.u32(*x));
    }
    fn f32s(&mut self, v: &[f32]) {
        self.len(v.len());
        self.0.reserve(v.len() * 4);
        v.iter()
            .for_each(|x| self.0.extend_from_slice(&x.to_le_bytes()));
    }
}

struct Dec<'a> {
    buf: &'a [u8],
}

fn malformed(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("malformed peer frame: {what}"),
    )
}

impl Dec<'_> {
    fn take(&mut self, n: usize) -> io::Result<&[u8]> {
        if self.buf.len() < n {
            return Err(malformed("truncated"));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn u8(&mut self) -> io::Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> io::Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> io::Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn len(&mut self, elem: usize) -> io::Result<usize> {
        let n = self.u32()? as usize;
        if n.saturating_mul(elem) > self.buf.len() {
            return Err(malformed("length past the end"));
        }
        Ok(n)
    }
    fn str(&mut self) -> io::Result<String> {
        let n = self.len(1)?;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| malformed("not UTF-8"))
    }
    fn u32s(&mut self) -> io::Result<Vec<u32>> {
        let n = self.len(4)?;
        (0..n).map(|_| self.u32()).collect()
    }
    fn f32s(&mut self) -> io::Result<Vec<f32>> {
        let n = self.len(4)?;
        Ok(self
            .take(n * 4)?
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect())
    }
}

impl PeerMsg {
    /// The whole frame: length, then body, in one buffer so that it leaves in one write.
    fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        e.u32(0);
        match self {
            PeerMsg::Hello {
                version,
                home,
                token,
            } => {
                e.u8(TAG_HELLO);
                e.u32(*version);
                e.str(home);
                e.str(token.expose());
            }
            PeerMsg::Reserve { call, seq, blocks } => {
                e.u8(2);
                e.u64(*call);
                e.u64(*seq);
                e.u32(*blocks);
            }
            PeerMsg::Reserved {
                call,
                blocks,
                refusal,
            } => {
                e.u8(3);
                e.u64(*call);
                e.u32s(blocks);
                e.str(refusal);
            }
            PeerMsg::Release { seq } => {
                e.u8(4);
                e.u64(*seq);
            }
            PeerMsg::Attn { call, attn } => {
                e.u8(5);
                e.u64(*call);
                e.u32(attn.layer);
                e.u8(u8::from(attn.linked));
                e.len(attn.parts.len());
                for p in &attn.parts {
                    e.u64(p.seq);
                    e.u32(p.first_row_pos);
                    e.u32(p.rows);
                    e.f32s(&p.q);
                    e.len(p.segments.len());
                    for s in &p.segments {
                        e.u32(s.block);
                        e.u32(s.first_pos);
                        e.u32(s.tokens);
                    }
                    e.len(p.appends.len());
                    for a in &p.appends {
                        e.u32(a.row);
                        e.u32(a.block);
                        e.u32(a.offset);
                        e.f32s(&a.k);
                        e.f32s(&a.v);
                    }
                }
            }
            PeerMsg::AttnOut { call, parts } => {
                e.u8(6);
                e.u64(*call);
                e.len(parts.len());
                for p in parts {
                    e.f32s(&p.o);
                    e.f32s(&p.lse);
                }
            }
            PeerMsg::Failure { call, message } => {
                e.u8(7);
                e.u64(*call);
                e.str(message);
            }
            PeerMsg::Reclaim => e.u8(8),
            PeerMsg::Recall { seq } => {
                e.u8(22);
                e.u64(*seq);
            }
            PeerMsg::LinkOffer { id } => {
                e.u8(20);
                e.u32s(&id.iter().map(|&b| u32::from(b)).collect::<Vec<_>>());
            }
            PeerMsg::LinkAnswer { accepted, reason } => {
                e.u8(21);
                e.u8(u8::from(*accepted));
                e.str(reason);
            }
            PeerMsg::Fetch { call, seq, block } => {
                e.u8(9);
                e.u64(*call);
                e.u64(*seq);
                e.u32(*block);
            }
            PeerMsg::Fetched { call, data } => {
                e.u8(10);
                e.u64(*call);
                e.f32s(data);
            }
            PeerMsg::Store {
                call,
                seq,
                block,
                data,
            } => {
                e.u8(11);
                e.u64(*call);
                e.u64(*seq);
                e.u32(*block);
                e.f32s(data);
            }
            PeerMsg::Stored { call } => {
                e.u8(12);
                e.u64(*call);
            }
            PeerMsg::ReleaseBlocks { seq, blocks } => {
                e.u8(13);
                e.u64(*seq);
                e.u32s(blocks);
            }
            PeerMsg::MoveBlocks {
                call,
                seq,
                blocks,
                fetch,
            } => {
                e.u8(14);
                e.u64(*call);
                e.u64(*seq);
                e.u32s(blocks);
                e.u8(u8::from(*fetch));
            }
            PeerMsg::Moved { call } => {
                e.u8(15);
                e.u64(*call);
            }
        }
        e.0
    }

    /// One frame's body (without its length).
    pub fn decode(buf: &[u8]) -> io::Result<Self> {
        let mut d = Dec { buf };
        let msg = match d.u8()? {
            TAG_HELLO_V1 => PeerMsg::Hello {
                version: 1,
                home: d.str()?,
                token: Secret::new(d.str()?),
            },
            TAG_HELLO => PeerMsg::Hello {
                version: d.u32()?,
                home: d.str()?,
                token: Secret::new(d.str()?),
            },
            2 => PeerMsg::Reserve {
                call: d.u64()?,
                seq: d.u64()?,
                blocks: d.u32()?,
            },
            3 => PeerMsg::Reserved {
                call: d.u64()?,
                blocks: d.u32s()?,
                refusal: d.str()?,
            },
            4 => PeerMsg::Release { seq: d.u64()? },
            5 => {
                let call = d.u64()?;
                let layer = d.u32()?;
                let linked = d.u8()? != 0;
                let n = d.len(1)?;
                let mut parts = Vec::with_capacity(n);
                for _ in 0..n {
                    let (seq, first_row_pos, rows, q) = (d.u64()?, d.u32()?, d.u32()?, d.f32s()?);
                    let segs = d.len(12)?;
                    let segments = (0..segs)
                        .map(|_| {
                            Ok(KvSegment {
                                block: d.u32()?,
                                first_pos: d.u32()?,
                                tokens: d.u32()?,
                            })
                        })
                        .collect::<io::Result<_>>()?;
                    let apps = d.len(12)?;
                    let appends = (0..apps)
                        .map(|_| {
                            Ok(Append {
                                row: d.u32()?,
                                block: d.u32()?,
                                offset: d.u32()?,
                                k: d.f32s()?,
                                v: d.f32s()?,
                            })
                        })
                        .collect::<io::Result<_>>()?;
                    parts.push(PartIn {
                        seq,
                        first_row_pos,
                        rows,
                        q,
                        segments,
                        appends,
                    });
                }
                PeerMsg::Attn {
                    call,
                    attn: AttnCall {
                        layer,
                        linked,
                        parts,
                    },
                }
            }
            6 => {
                let call = d.u64()?;
                let n = d.len(8)?;
                let parts = (0..n)
                    .map(|_| {
                        Ok(PartOut {
                            o: d.f32s()?,
                            lse: d.f32s()?,
                        })
                    })
                    .collect::<io::Result<_>>()?;
                PeerMsg::AttnOut { call, parts }
            }
            7 => PeerMsg::Failure {
                call: d.u64()?,
                message: d.str()?,
            },
            8 => PeerMsg::Reclaim,
            22 => PeerMsg::Recall { seq: d.u64()? },
            20 => PeerMsg::LinkOffer {
                id: d.u32s()?.into_iter().map(|b| b as u8).collect(),
            },
            21 => PeerMsg::LinkAnswer {
                accepted: d.u8()? != 0,
                reason: d.str()?,
            },
            9 => PeerMsg::Fetch {
                call: d.u64()?,
                seq: d.u64()?,
                block: d.u32()?,
            },
            10 => PeerMsg::Fetched {
                call: d.u64()?,
                data: d.f32s()?,
            },
            11 => PeerMsg::Store {
                call: d.u64()?,
                seq: d.u64()?,
                block: d.u32()?,
                data: d.f32s()?,
            },
            12 => PeerMsg::Stored { call: d.u64()? },
            13 => PeerMsg::ReleaseBlocks {
                seq: d.u64()?,
                blocks: d.u32s()?,
            },
            14 => PeerMsg::MoveBlocks {
                call: d.u64()?,
                seq: d.u64()?,
                blocks: d.u32s()?,
                fetch: d.u8()? != 0,
            },
            15 => PeerMsg::Moved { call: d.u64()? },
            t => return Err(malformed(&format!("unknown tag {t}"))),
        };
        if !d.buf.is_empty() {
            return Err(malformed("trailing bytes"));
        }
        Ok(msg)
    }

    pub fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        let mut frame = self.encode();
        let body = (frame.len() - 4) as u32;
        frame[..4].copy_from_slice(&body.to_le_bytes());
        w.write_all(&frame)
    }

    /// Reads one frame of at most `max_frame` bytes. Memory grows with the bytes that actually
    /// arrive, never with what the length prefix claims.
    pub fn read_capped(r: &mut impl Read, max_frame: usize) -> io::Result<Self> {
        let mut len = [0u8; 4];
        r.read_exact(&mut len)?;
        let len = u32::from_le_bytes(len) as usize;
        if len > max_frame {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                FrameTooLarge {
                    len,
                    max: max_frame,
                },
            ));
        }
        let mut body = Vec::with_capacity(len.min(READ_CHUNK));
        r.take(len as u64).read_to_end(&mut body)?;
        if body.len() < len {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Self::decode(&body)
    }

    /// Reads one frame of up to 1 MiB, for tests.
    #[cfg(test)]
    pub fn read_from(r: &mut impl Read) -> io::Result<Self> {
        Self::read_capped(r, 1 << 20)
    }
}

/// What a frame is given room for before its bytes arrive.
const READ_CHUNK: usize = 64 << 10;

/// A length prefix above what the connection allows.
#[derive(Debug, thiserror::Error)]
#[error("a frame of {len} bytes, above the {max} this connection allows")]
pub struct FrameTooLarge {
    pub len: usize,
    pub max: usize,
}

impl PeerMsg {
    /// The call a message belongs to, if it names one.
    pub fn call(&self) -> Option<u64> {
        match self {
            PeerMsg::Reserve { call, .. }
            | PeerMsg::Reserved { call, .. }
            | PeerMsg::Attn { call, .. }
            | PeerMsg::AttnOut { call, .. }
            | PeerMsg::Failure { call, .. }
            | PeerMsg::Fetch { call, .. }
            | PeerMsg::Fetched { call, .. }
            | PeerMsg::Store { call, .. }
            | PeerMsg::Stored { call }
            | PeerMsg::MoveBlocks { call, .. }
            | PeerMsg::Moved { call } => Some(*call),
            PeerMsg::Hello { .. }
            | PeerMsg::Release { .. }
            | PeerMsg::Reclaim
            | PeerMsg::Recall { .. }
            | PeerMsg::LinkOffer { .. }
            | PeerMsg::LinkAnswer { .. }
            | PeerMsg::ReleaseBlocks { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(m: PeerMsg) {
        let mut buf = Vec::new();
        m.write_to(&mut buf).unwrap();
        assert_eq!(PeerMsg::read_from(&mut buf.as_slice()).unwrap(), m);
        // Any truncation is an error, never a panic or a wrong message.
        for cut in 0..buf.len() {
            assert!(PeerMsg::read_from(&mut &buf[..cut]).is_err());
        }
        // So is a frame above the connection's cap.
        assert!(PeerMsg::read_capped(&mut buf.as_slice(), buf.len() - 5).is_err());
    }

    #[test]
    fn every_message_round_trips_and_truncation_is_refused() {
        round_trip(PeerMsg::Hello {
            version: PROTOCOL_VERSION,
            home: "w0".into(),
            token: Secret::new("t"),
        });
        round_trip(PeerMsg::Reserve {
            call: 1,
            seq: 2,
            blocks: 3,
        });
        round_trip(PeerMsg::Reserved {
            call: 1,
            blocks: vec![4, 5],
            refusal: String::new(),
        });
        round_trip(PeerMsg::Release { seq: 9 });
        round_trip(PeerMsg::Attn {
            call: 7,
            attn: AttnCall {
                layer: 3,
                linked: false,
                parts: vec![PartIn {
                    seq: 1,
                    first_row_pos: 40,
                    rows: 1,
                    q: vec![0.5, -1.25],
                    segments: vec![KvSegment {
                        block: 2,
                        first_pos: 32,
                        tokens: 9,
                    }],
                    appends: vec![Append {
                        row: 0,
                        block: 2,
                        offset: 8,
                        k: vec![1.0],
                        v: vec![2.0],
                    }],
                }],
            },
        });
        round_trip(PeerMsg::AttnOut {
            call: 7,
            parts: vec![PartOut {
                o: vec![1.0, 2.0],
                lse: vec![0.1],
            }],
        });
        round_trip(PeerMsg::Failure {
            call: 7,
            message: "lost".into(),
        });
        round_trip(PeerMsg::Reclaim);
        round_trip(PeerMsg::Recall { seq: 1 << 50 });
        round_trip(PeerMsg::LinkOffer {
            id: (0..128).map(|i| (i * 7) as u8).collect(),
        });
        round_trip(PeerMsg::LinkAnswer {
            accepted: false,
            reason: "no GPU".into(),
        });
        round_trip(PeerMsg::Fetch {
            call: 8,
            seq: 2,
            block: 5,
        });
        round_trip(PeerMsg::Fetched {
            call: 8,
            data: vec![0.25, -3.0],
        });
        round_trip(PeerMsg::Store {
            call: 9,
            seq: 2,
            block: 6,
            data: vec![1.5],
        });
        round_trip(PeerMsg::Stored { call: 9 });
        round_trip(PeerMsg::MoveBlocks {
            call: 10,
            seq: 4,
            blocks: vec![7, 2, 9],
            fetch: true,
        });
        round_trip(PeerMsg::Moved { call: 10 });
        round_trip(PeerMsg::ReleaseBlocks {
            seq: 2,
            blocks: vec![5, 7],
        });
    }

    #[test]
    fn garbage_is_refused() {
        let mut frame = Vec::new();
        frame.extend_from_slice(&5u32.to_le_bytes());
        frame.extend_from_slice(&[42, 0, 0, 0, 0]);
        assert!(PeerMsg::read_from(&mut frame.as_slice()).is_err());
        let huge = (u32::MAX).to_le_bytes();
        assert!(PeerMsg::read_from(&mut huge.as_slice()).is_err());
    }

    #[test]
    fn a_version_1_hello_is_read_as_version_1() {
        let mut e = Enc::default();
        e.u8(TAG_HELLO_V1);
        e.str("w0");
        e.str("t");
        match PeerMsg::decode(&e.0).unwrap() {
            PeerMsg::Hello { version, home, .. } => assert_eq!((version, home.as_str()), (1, "w0")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_token_is_redacted_in_debug() {
        let hello = PeerMsg::Hello {
            version: PROTOCOL_VERSION,
            home: "w0".into(),
            token: Secret::new("very-secret"),
        };
        assert!(!format!("{hello:?}").contains("very-secret"));
    }
}
