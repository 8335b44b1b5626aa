//! Block migration over NCCL between two GPUs, in one process, the way the migrator and a
//! creditor use it: the home queues its side of a move, the creditor then queues the other
//! side, and both wait for it. Blocks of random K/V arrive bit for bit in both directions,
//! every other block is left as it was, and a move the other end never pairs fails within its
//! timeout (the link aborted) instead of hanging.
//!
//! Needs two GPUs and NCCL (`make test-gpu` on `nvidia-h200-x2` or `-x4`); elsewhere it says it
//! is skipped and passes.

use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread;
use std::time::{Duration, Instant};

use cudarc::driver::CudaContext;
use infinite_llm_worker::backend::cuda::{self, Cuda, CudaKv};
use infinite_llm_worker::backend::{Backend, DeviceLink, KvShape, LinkError, nccl};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Eight layers of Llama-3-8B's blocks (8 KV heads of 128, 16 tokens).
const SHAPE: KvShape = KvShape {
    layers: 8,
    blocks: 12,
    block_tokens: 16,
    kv_heads: 8,
    head_dim: 128,
};
const WAIT: Duration = Duration::from_secs(10);

fn two_gpus() -> bool {
    let gpus = if cuda::available() {
        CudaContext::device_count().unwrap_or(0)
    } else {
        0
    };
    if gpus < 2 || !nccl::available() {
        eprintln!(
            "SKIPPED: block moves over NCCL need two GPUs and libnccl; this machine has {gpus} GPUs{} (run `make test-gpu` on nvidia-h200-x2)",
            if nccl::available() {
                ""
            } else {
                " and no NCCL"
            }
        );
        return false;
    }
    true
}

/// One GPU's pool, every block filled with random values (as the bf16 cache holds them).
fn filled_pool(gpu: &Cuda, seed: u64) -> (CudaKv, Vec<Vec<f32>>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut kv = gpu.alloc_kv(SHAPE);
    let n = 2 * SHAPE.layers * SHAPE.block_floats();
    for block in 0..SHAPE.blocks as u32 {
        let data: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
        gpu.kv_write_block(&mut kv, block, &data);
    }
    let blocks = (0..SHAPE.blocks as u32)
        .map(|b| gpu.kv_read_block(&kv, b))
        .collect();
    (kv, blocks)
}

/// What the home thread tells the creditor thread.
enum Ask {
    /// Pair the home's queued move: send these blocks (`true`) or receive into them.
    Move(Vec<u32>, bool),
    /// Report every block.
    Blocks,
    Done,
}

/// The creditor: joins the link with `id`, then does what the home asks.
fn creditor(id: Vec<u8>, seed: u64, asks: Receiver<Ask>, answers: Sender<Vec<Vec<f32>>>) {
    let gpu = Cuda::new(1).expect("GPU 1 starts");
    let (mut kv, blocks) = filled_pool(&gpu, seed);
    let link = gpu.link_accept(&id).expect("joins the link");
    link.comm.wait_ready(WAIT).expect("the link comes up");
    answers.send(blocks).unwrap();
    for ask in asks {
        match ask {
            Ask::Move(blocks, send) => {
                gpu.link_move(&link, &mut kv, &blocks, send).unwrap();
                gpu.link_move_wait(&link, WAIT).unwrap();
                answers.send(Vec::new()).unwrap();
            }
            Ask::Blocks => answers
                .send(
                    (0..SHAPE.blocks as u32)
                        .map(|b| gpu.kv_read_block(&kv, b))
                        .collect(),
                )
                .unwrap(),
            Ask::Done => return,
        }
    }
}

/// The home's end: its GPU, pool and link, and the line to the creditor thread.
struct Home {
    gpu: Cuda,
    kv: CudaKv,
    link: DeviceLink,
    asks: Sender<Ask>,
    answers: Receiver<Vec<Vec<f32>>>,
}

impl Home {
    /// One move as the migrator makes it: queue the home's side, have the creditor pair it,
    /// wait for it. `fetch`: from the creditor's `theirs` into `mine`; else the other way.
    fn move_blocks(&mut self, mine: &[u32], theirs: &[u32], fetch: bool) {
        self.gpu
            .link_move(&self.link, &mut self.kv, mine, !fetch)
            .unwrap();
        self.asks.send(Ask::Move(theirs.to_vec(), fetch)).unwrap();
        self.answers
            .recv_timeout(WAIT)
            .expect("the creditor's side is done");
        self.gpu.link_move_wait(&self.link, WAIT).unwrap();
    }

    fn creditor_blocks(&self) -> Vec<Vec<f32>> {
        self.asks.send(Ask::Blocks).unwrap();
        self.answers.recv_timeout(WAIT).unwrap()
    }
}

#[test]
fn blocks_move_between_gpus_bit_for_bit_and_an_unpaired_move_times_out() {
    if !two_gpus() {
        return;
    }
    let seed = rand::random::<u64>();
    eprintln!("seed {seed}");
    let gpu = Cuda::new(0).expect("GPU 0 starts");
    let (kv, mut mine) = filled_pool(&gpu, seed);
    let (link, id) = gpu.link_offer().expect("a GPU offers links").unwrap();
    let (asks, ask_rx) = channel();
    let (answer_tx, answers) = channel();
    let far = thread::spawn(move || creditor(id, seed ^ 1, ask_rx, answer_tx));
    link.comm.wait_ready(WAIT).expect("the link comes up");
    let mut theirs = answers.recv_timeout(WAIT).expect("the creditor's pool");
    let mut home = Home {
        gpu,
        kv,
        link,
        asks,
        answers,
    };

    // An evacuation: the creditor's blocks 3 and 9 into the home's 1 and 2, in that order.
    home.move_blocks(&[1, 2], &[3, 9], true);
    mine[1] = theirs[3].clone();
    mine[2] = theirs[9].clone();
    for (b, want) in mine.iter().enumerate() {
        assert!(
            home.gpu.kv_read_block(&home.kv, b as u32) == *want,
            "home block {b} after the fetch"
        );
    }

    // An offload: the home's blocks 5, 0 and 7 into the creditor's 11, 4 and 6.
    home.move_blocks(&[5, 0, 7], &[11, 4, 6], false);
    for (from, to) in [(5, 11), (0, 4), (7, 6)] {
        theirs[to] = mine[from].clone();
    }
    for (b, got) in home.creditor_blocks().iter().enumerate() {
        assert!(*got == theirs[b], "creditor block {b} after the store");
    }

    // The creditor never pairs this one (as if it had died): the wait ends at its timeout
    // with the link aborted, and the link refuses everything after.
    let Home {
        gpu,
        mut kv,
        link,
        asks,
        ..
    } = home;
    gpu.link_move(&link, &mut kv, &[4], true).unwrap();
    let started = Instant::now();
    let waited = gpu.link_move_wait(&link, Duration::from_millis(500));
    let took = started.elapsed();
    eprintln!("an unpaired move gave up after {took:?}: {waited:?}");
    assert!(
        matches!(waited, Err(LinkError::Timeout { .. })),
        "{waited:?}"
    );
    assert!(took < Duration::from_secs(3), "gave up after {took:?}");
    assert!(matches!(gpu.link_moved(&link), Err(LinkError::Aborted)));
    asks.send(Ask::Done).unwrap();
    far.join().unwrap();
}
