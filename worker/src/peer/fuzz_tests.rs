//! Generated frames, from fixed seeds (so a failure replays), through the wire decoder and
//! through the creditor's whole handling of a home's frame: the checks, the loan checks, and
//! the work on a real CPU KV cache. Nothing may panic, and whatever passes the checks must be
//! served with outputs of the size the call asked for.

use std::io::Read;
use std::net::{TcpListener, TcpStream};

use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::frame_checks::FrameLimits;
use super::wire::PROTOCOL_VERSION;
use super::{PeerMsg, Responder};
use crate::backend::cpu::Cpu;
use crate::backend::{AttnShape, Backend, KvSegment, KvShape};
use crate::creditor::{KvWork, serve_pool_request};
use crate::dist_attention::{self, Append, AttnCall, PartIn, PartOut};
use crate::rmanager::RManager;

const DECODER_SEED: u64 = 0x5eed_0001;
const HANDLER_SEED: u64 = 0x5eed_0002;
const FRAMES: usize = 20_000;

const LIMITS: FrameLimits = FrameLimits {
    kv: KvShape {
        layers: 2,
        blocks: 8,
        block_tokens: 16,
        kv_heads: 2,
        head_dim: 4,
    },
    q_heads: 4,
    max_rows: 32,
};

/// Mostly in range, sometimes just out, sometimes wild.
fn near(rng: &mut ChaCha8Rng, bound: u32) -> u32 {
    match rng.random_range(0..10) {
        0 => bound,
        1 => bound + 1,
        2 => rng.random(),
        3 => u32::MAX,
        _ => rng.random_range(0..bound.max(1)),
    }
}

fn floats(rng: &mut ChaCha8Rng, want: usize) -> Vec<f32> {
    let n = match rng.random_range(0..10) {
        0 => rng.random_range(0..want + 3),
        1 => 0,
        _ => want,
    };
    (0..n).map(|_| rng.random_range(-2.0..2.0)).collect()
}

fn part(rng: &mut ChaCha8Rng, linked: bool, lent: &[u32]) -> PartIn {
    let l = LIMITS;
    let rows = near(rng, 4).max(u32::from(rng.random_range(0..8) != 0));
    let width = |w: usize| if linked { 0 } else { w };
    let block = |rng: &mut ChaCha8Rng| match rng.random_range(0..4) {
        0 => near(rng, l.kv.blocks as u32),
        _ => *lent.choose(rng).unwrap(),
    };
    let small_rows = rows.min(64) as usize;
    PartIn {
        seq: if rng.random_range(0..8) == 0 { 2 } else { 1 },
        first_row_pos: near(rng, 200),
        rows,
        q: floats(rng, small_rows * width(l.q_heads * l.kv.head_dim)),
        segments: (0..rng.random_range(0..4))
            .map(|_| KvSegment {
                block: block(rng),
                first_pos: near(rng, 200),
                tokens: near(rng, 17),
            })
            .collect(),
        appends: (0..rng.random_range(0..3))
            .map(|_| Append {
                row: near(rng, rows.min(8)),
                block: block(rng),
                offset: near(rng, 16),
                k: floats(rng, width(l.kv.kv_heads * l.kv.head_dim)),
                v: floats(rng, width(l.kv.kv_heads * l.kv.head_dim)),
            })
            .collect(),
    }
}

fn message(rng: &mut ChaCha8Rng, lent: &[u32]) -> PeerMsg {
    let call = rng.random();
    let block_values = LIMITS.block_values();
    match rng.random_range(0..12) {
        0 => PeerMsg::Reserve {
            call,
            seq: 1,
            blocks: near(rng, 9),
        },
        1 => PeerMsg::Release { seq: 2 },
        2 => PeerMsg::ReleaseBlocks {
            seq: 2,
            blocks: vec![near(rng, 8)],
        },
        3 => PeerMsg::Fetch {
            call,
            seq: 1,
            block: *lent.choose(rng).unwrap(),
        },
        4 => PeerMsg::Store {
            call,
            seq: 1,
            block: near(rng, 8),
            data: floats(rng, block_values),
        },
        5 => PeerMsg::Hello {
            version: PROTOCOL_VERSION,
            home: "h".into(),
            token: infinite_llm_protocol::secret::Secret::new("t"),
        },
        6 => PeerMsg::AttnOut {
            call,
            parts: vec![PartOut {
                o: floats(rng, 16),
                lse: floats(rng, 4),
            }],
        },
        _ => {
            let linked = rng.random_range(0..6) == 0;
            PeerMsg::Attn {
                call,
                attn: AttnCall {
                    layer: near(rng, 2),
                    linked,
                    parts: (0..rng.random_range(0..3))
                        .map(|_| part(rng, linked, lent))
                        .collect(),
                },
            }
        }
    }
}

#[test]
fn the_decoder_never_panics_on_mutated_frames() {
    let mut rng = ChaCha8Rng::seed_from_u64(DECODER_SEED);
    let lent = [0, 1, 2];
    let mut decoded = 0;
    for _ in 0..FRAMES {
        let msg = message(&mut rng, &lent);
        let mut frame = Vec::new();
        msg.write_to(&mut frame).unwrap();
        assert_eq!(PeerMsg::decode(&frame[4..]).unwrap(), msg);
        let mut body = frame[4..].to_vec();
        for _ in 0..rng.random_range(1..4) {
            match rng.random_range(0..4) {
                0 => body.truncate(rng.random_range(0..=body.len())),
                1 => body.push(rng.random()),
                _ if !body.is_empty() => {
                    let at = rng.random_range(0..body.len());
                    body[at] = rng.random();
                }
                _ => {}
            }
        }
        decoded += usize::from(PeerMsg::decode(&body).is_ok());
    }
    // Some mutations still decode (a changed value), most do not; none panicked.
    assert!(decoded > 0 && decoded < FRAMES, "{decoded}");
}

/// A responder whose answers are read and dropped by a thread.
fn responder() -> Responder {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut home = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (creditor, _) = listener.accept().unwrap();
    std::thread::spawn(move || {
        let mut sink = [0u8; 1 << 16];
        while home.read(&mut sink).is_ok_and(|n| n > 0) {}
    });
    Responder::new(creditor)
}

#[test]
fn the_creditor_serves_only_checked_frames_and_never_panics() {
    let mut rng = ChaCha8Rng::seed_from_u64(HANDLER_SEED);
    let backend = Cpu::new();
    let mut kv = backend.alloc_kv(LIMITS.kv);
    let shape = AttnShape {
        q_heads: LIMITS.q_heads,
        kv_heads: LIMITS.kv.kv_heads,
        head_dim: LIMITS.kv.head_dim,
        scale: 0.5,
    };
    let mut rm = RManager::new(LIMITS.kv.blocks, 1.0);
    let lent = rm.lend_up_to(("h#0".into(), 1), 3).unwrap();
    rm.lend_up_to(("other#1".into(), 1), 2).unwrap();
    let reply = responder();
    let (mut refused, mut served) = (0, 0);
    for _ in 0..FRAMES {
        let msg = message(&mut rng, &lent);
        if LIMITS.check_request(&msg).is_err() {
            refused += 1;
            continue;
        }
        // Reservations and releases come and go; the request keeps its first blocks.
        if matches!(msg, PeerMsg::Release { .. } | PeerMsg::ReleaseBlocks { .. }) {
            continue;
        }
        let Some(work) = serve_pool_request(&mut rm, "h#0".into(), msg, reply.clone()) else {
            continue;
        };
        served += 1;
        match work {
            KvWork::Attn { attn, .. } => {
                let answer =
                    dist_attention::answer(&backend, &mut kv, shape, LIMITS.kv.layers, &attn, None);
                if attn.linked {
                    assert!(answer.is_err(), "a linked call without a link");
                    continue;
                }
                let parts = answer.unwrap();
                for (p, out) in attn.parts.iter().zip(&parts) {
                    let rows = p.rows as usize;
                    assert_eq!(out.lse.len(), rows * shape.q_heads);
                    assert_eq!(out.o.len(), rows * shape.q_heads * shape.head_dim);
                }
            }
            KvWork::Fetch { block, .. } => {
                assert_eq!(
                    backend.kv_read_block(&kv, block).len(),
                    LIMITS.block_values()
                );
            }
            KvWork::Store { block, data, .. } => backend.kv_write_block(&mut kv, block, &data),
            KvWork::Move { .. } => {}
        }
    }
    assert!(
        refused > FRAMES / 10 && served > FRAMES / 10,
        "{refused} refused, {served} served"
    );
}
