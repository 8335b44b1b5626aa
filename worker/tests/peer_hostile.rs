//! A client that speaks the peer protocol sends a worker every kind of bad frame: values out
//! of the cache's range, blocks lent to another home, lengths that lie, a 1 GiB length prefix,
//! garbage before `Hello`, a wrong protocol version, silence. The worker answers `Failure` or
//! closes, counts each refusal, keeps serving its own requests with the same greedy text, and
//! its memory stays bounded.

mod local_support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use infinite_llm_worker::backend::KvSegment;
use infinite_llm_worker::dist_attention::{Append, AttnCall, PartIn};
use infinite_llm_worker::peer::PeerMsg;
use infinite_llm_worker::peer::wire::PROTOCOL_VERSION;
use infinite_llm_worker::server::Secret;
use local_support::{demo_model, greedy_text, metric, pool_view, prompt, start_pool};

/// The demo model's geometry: 8 query heads and 2 KV heads of 32, 4 layers, 16-token blocks.
const Q_WIDTH: usize = 8 * 32;
const KV_WIDTH: usize = 2 * 32;
const LAYERS: u32 = 4;
const BLOCK_TOKENS: u32 = 16;
const KV_BLOCKS: usize = 64;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

struct Home {
    stream: TcpStream,
    next_call: u64,
}

impl Home {
    fn raw(addr: &str) -> TcpStream {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    fn connect(addr: &str, name: &str, token: &str) -> Self {
        let mut stream = Self::raw(addr);
        hello(PROTOCOL_VERSION, name, token)
            .write_to(&mut stream)
            .unwrap();
        Home {
            stream,
            next_call: 1,
        }
    }

    fn call(&mut self, msg: impl FnOnce(u64) -> PeerMsg) -> PeerMsg {
        let call = self.next_call;
        self.next_call += 1;
        msg(call).write_to(&mut self.stream).unwrap();
        let answer = PeerMsg::read_capped(&mut self.stream, 64 << 20).expect("an answer");
        assert_eq!(answer.call(), Some(call), "{answer:?}");
        answer
    }

    fn reserve(&mut self, seq: u64, blocks: u32) -> Vec<u32> {
        match self.call(|call| PeerMsg::Reserve { call, seq, blocks }) {
            PeerMsg::Reserved { blocks, .. } => blocks,
            other => panic!("{other:?}"),
        }
    }
}

fn hello(version: u32, home: &str, token: &str) -> PeerMsg {
    PeerMsg::Hello {
        version,
        home: home.into(),
        token: Secret::new(token),
    }
}

/// One decode row at position 20 over 16 tokens of `block`, writing its own K/V at offset 4
/// of `block` (the second block of the request).
fn attn(layer: u32, block: u32) -> AttnCall {
    AttnCall {
        layer,
        linked: false,
        parts: vec![PartIn {
            seq: 1,
            first_row_pos: 20,
            rows: 1,
            q: vec![0.1; Q_WIDTH],
            segments: vec![KvSegment {
                block,
                first_pos: 0,
                tokens: BLOCK_TOKENS,
            }],
            appends: vec![Append {
                row: 0,
                block,
                offset: 4,
                k: vec![0.2; KV_WIDTH],
                v: vec![0.3; KV_WIDTH],
            }],
        }],
    }
}

/// True once the worker has closed `stream` (reads end), within the read timeout.
fn closed(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => {
                return matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                );
            }
        }
    }
}

fn failure(msg: PeerMsg) -> String {
    match msg {
        PeerMsg::Failure { message, .. } => message,
        other => panic!("expected a Failure, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_survives_every_kind_of_bad_peer_frame() {
    let (_dir, model) = demo_model();
    let pool = start_pool(&model, 1, KV_BLOCKS, &[]);
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let worker = pool.workers[0].clone();
    let own_prompt = prompt(40, 3);
    let before = greedy_text(client.clone(), worker.clone(), own_prompt.clone(), 24).await;
    let peer_addr = loop {
        if let Some(view) = pool_view(&client, &pool).await
            && let Some(addr) = view["workers"][0]["peer_addr"].as_str()
        {
            break addr.to_owned();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let pid = pool.pids[0];
    let rss_before = rss_kib(pid);
    let token = pool.token.trim().to_owned();

    let (addr, tok) = (peer_addr.clone(), token.clone());
    let checks = tokio::task::spawn_blocking(move || {
        let mut a = Home::connect(&addr, "attacker", &tok);
        let mine = a.reserve(1, 2);
        let mut b = Home::connect(&addr, "bystander", &tok);
        let theirs = b.reserve(1, 1);
        assert_eq!((mine.len(), theirs.len()), (2, 1));
        let (own, other) = (mine[0], theirs[0]);

        // A well-formed call over its own block is answered.
        assert!(matches!(
            a.call(|call| PeerMsg::Attn {
                call,
                attn: attn(0, own)
            }),
            PeerMsg::AttnOut { .. }
        ));
        // Each bad value gets a Failure that names it; the connection stays usable.
        let bad: Vec<(&str, AttnCall)> = vec![
            ("layer", attn(LAYERS, own)),
            ("block", attn(0, KV_BLOCKS as u32 + 5)),
            ("offset", {
                let mut c = attn(0, own);
                c.parts[0].appends[0].offset = BLOCK_TOKENS;
                c
            }),
            ("row", {
                let mut c = attn(0, own);
                c.parts[0].appends[0].row = 1;
                c
            }),
            ("tokens", {
                let mut c = attn(0, own);
                c.parts[0].segments[0].tokens = BLOCK_TOKENS + 1;
                c
            }),
            ("q holds", {
                let mut c = attn(0, own);
                c.parts[0].rows = 3;
                c
            }),
            ("k holds", {
                let mut c = attn(0, own);
                c.parts[0].appends[0].k.truncate(3);
                c
            }),
            ("overflow", {
                let mut c = attn(0, own);
                c.parts[0].first_row_pos = u32::MAX;
                c
            }),
            ("not lent", attn(0, other)),
        ];
        for (what, call_body) in bad {
            let message = failure(a.call(|call| PeerMsg::Attn {
                call,
                attn: call_body,
            }));
            assert!(message.contains(what), "{what}: {message}");
        }
        let message = failure(a.call(|call| PeerMsg::Fetch {
            call,
            seq: 1,
            block: other,
        }));
        assert!(message.contains("not lent"), "{message}");
        let message = failure(a.call(|call| PeerMsg::Store {
            call,
            seq: 1,
            block: own,
            data: vec![0.0; 7],
        }));
        assert!(message.contains("holds 7 values"), "{message}");
        assert!(matches!(
            a.call(|call| PeerMsg::Attn {
                call,
                attn: attn(LAYERS - 1, own)
            }),
            PeerMsg::AttnOut { .. }
        ));

        // A body whose inner length lies (a q of a million floats in a 40-byte frame).
        let mut lie = Vec::new();
        lie.extend_from_slice(&40u32.to_le_bytes());
        lie.push(5);
        lie.extend_from_slice(&9u64.to_le_bytes());
        lie.extend_from_slice(&0u32.to_le_bytes());
        lie.push(0);
        lie.extend_from_slice(&1u32.to_le_bytes());
        lie.extend_from_slice(&1u64.to_le_bytes());
        lie.extend_from_slice(&[0; 8]);
        lie.extend_from_slice(&1_000_000u32.to_le_bytes());
        lie.resize(44, 0);
        a.stream.write_all(&lie).unwrap();
        let message = failure(PeerMsg::read_capped(&mut a.stream, 1 << 20).unwrap());
        assert!(message.contains("malformed"), "{message}");
        assert!(
            closed(&mut a.stream),
            "a malformed frame ends the connection"
        );

        // A 1 GiB length prefix after Hello: refused without allocating it, then closed.
        let mut big = Home::connect(&addr, "big", &tok);
        big.stream.write_all(&(1u32 << 30).to_le_bytes()).unwrap();
        let _ = big.stream.write_all(&[0; 1024]);
        let message = failure(PeerMsg::read_capped(&mut big.stream, 1 << 20).unwrap());
        assert!(message.contains("above the"), "{message}");
        assert!(closed(&mut big.stream));

        // Before Hello: a 1 GiB prefix, garbage, a wrong token, another message: closed.
        for first in [
            (1u32 << 30).to_le_bytes().to_vec(),
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            {
                let mut f = Vec::new();
                hello(PROTOCOL_VERSION, "x", "wrong-token")
                    .write_to(&mut f)
                    .unwrap();
                f
            },
            {
                let mut f = Vec::new();
                PeerMsg::Release { seq: 1 }.write_to(&mut f).unwrap();
                f
            },
        ] {
            let mut s = Home::raw(&addr);
            let _ = s.write_all(&first);
            assert!(closed(&mut s), "{first:?}");
        }

        // A wrong version: refused with a message naming both versions, then closed.
        for version in [1, PROTOCOL_VERSION + 1] {
            let mut s = Home::raw(&addr);
            hello(version, "old", &tok).write_to(&mut s).unwrap();
            let message = failure(PeerMsg::read_capped(&mut s, 1 << 20).unwrap());
            assert!(
                message.contains(&format!("version {PROTOCOL_VERSION}"))
                    && message.contains(&format!("version {version}")),
                "{message}"
            );
            assert!(closed(&mut s));
        }
        // A version 1 Hello (no version field, tag 1) is named as version 1 too.
        let mut s = Home::raw(&addr);
        let mut v1 = vec![1u8];
        for field in ["old", tok.as_str()] {
            v1.extend_from_slice(&(field.len() as u32).to_le_bytes());
            v1.extend_from_slice(field.as_bytes());
        }
        s.write_all(&(v1.len() as u32).to_le_bytes()).unwrap();
        s.write_all(&v1).unwrap();
        let message = failure(PeerMsg::read_capped(&mut s, 1 << 20).unwrap());
        assert!(message.contains("version 1"), "{message}");

        // Silence before Hello: closed after the deadline; beyond 16 silent connections,
        // new ones are closed at once.
        let started = Instant::now();
        let mut silent: Vec<TcpStream> = (0..24).map(|_| Home::raw(&addr)).collect();
        let refused_at_once = silent
            .iter_mut()
            .skip(16)
            .map(|s| {
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                closed(s)
            })
            .filter(|&c| c)
            .count();
        assert!(
            refused_at_once >= 7,
            "{refused_at_once} of 8 refused at once"
        );
        assert!(closed(&mut silent[0]));
        let waited = started.elapsed();
        assert!(
            waited < Duration::from_secs(9),
            "a silent connection lived {waited:?}"
        );
        // With the silent ones gone, a home connects and is served again.
        drop(silent);
        std::thread::sleep(Duration::from_millis(200));
        let mut again = Home::connect(&addr, "again", &tok);
        assert_eq!(again.reserve(2, 1).len(), 1);
        b
    })
    .await
    .unwrap();

    // The worker's own requests give the same greedy text.
    let after = greedy_text(client.clone(), worker.clone(), own_prompt, 24).await;
    assert_eq!(after, before);
    drop(checks);
    let rss_after = rss_kib(pid);
    let grown = rss_after.saturating_sub(rss_before);
    eprintln!("worker RSS before {rss_before} KiB, after {rss_after} KiB (+{grown} KiB)");
    assert!(grown < 64 << 10, "RSS grew by {grown} KiB");
    for reason in [
        "layer",
        "blocks",
        "offset",
        "rows",
        "position",
        "length",
        "not_lent",
        "malformed",
        "too_large",
        "before_hello",
        "unauthenticated",
        "version",
        "hello_timeout",
        "busy",
    ] {
        let name = format!("ilm_peer_frames_rejected_total{{reason=\"{reason}\"}}");
        assert!(metric(&client, &worker, &name).await >= 1.0, "{name}");
    }
}
