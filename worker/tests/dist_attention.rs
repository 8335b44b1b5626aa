//! DistAttention through the real model, without a network: a home whose pool is far too small
//! borrows blocks from a creditor, the creditor stores the new K/V and runs MicroAttention over
//! them, and the home merges. Logits and greedy tokens must equal one worker with a big pool.

use std::path::Path;

use infinite_llm_worker::backend::Backend;
use infinite_llm_worker::backend::cpu::{Cpu, CpuKv};
use infinite_llm_worker::demo_model::{DemoModelSpec, write_demo_model};
use infinite_llm_worker::dist_attention::AttnCall;
use infinite_llm_worker::model::llama::{Exchange, Llama, Waited};
use infinite_llm_worker::rmanager::RManager;
use infinite_llm_worker::sampling::argmax;
use infinite_llm_worker::scheduler::{Scheduler, SchedulerConfig, StepRule};

const BT: usize = 16;

/// Creditors in the same process: each call is served at once by the creditor's own model.
struct Creditors {
    model: Llama<Cpu>,
    pools: Vec<(RManager, CpuKv)>,
    replies: Vec<(u16, Vec<infinite_llm_worker::dist_attention::PartOut>)>,
}

impl Exchange for Creditors {
    fn send(&mut self, calls: Vec<(u16, AttnCall)>) {
        for (peer, call) in calls {
            let (rm, kv) = &mut self.pools[peer as usize];
            for p in &call.parts {
                let key = ("home".to_string(), p.seq);
                rm.check_lent(&key, p.segments.iter().map(|s| s.block))
                    .unwrap();
            }
            let out = self.model.serve_attention(kv, &call, None).unwrap();
            self.replies.push((peer, out));
        }
    }

    fn wait(&mut self) -> Waited {
        Waited::Done(std::mem::take(&mut self.replies))
    }
}

/// Greedy logits for `prompt` plus `steps` tokens, with `home_blocks` local blocks and, when
/// short, blocks borrowed round-robin from `creditors` peers.
fn run(
    dir: &Path,
    prompt: &[u32],
    steps: usize,
    home_blocks: usize,
    creditors: usize,
) -> (Vec<Vec<f32>>, Vec<u32>, usize) {
    let mut home = Llama::load(dir, Cpu::new()).unwrap();
    let mut kv = home.backend().alloc_kv(home.kv_shape(home_blocks, BT));
    let creditor_model = Llama::load(dir, Cpu::new()).unwrap();
    let pools = (0..creditors)
        .map(|_| {
            let kv = creditor_model
                .backend()
                .alloc_kv(creditor_model.kv_shape(32, BT));
            (RManager::new(32, 1.0), kv)
        })
        .collect();
    let mut ex = Creditors {
        model: creditor_model,
        pools,
        replies: Vec::new(),
    };
    let mut sched = Scheduler::new(
        SchedulerConfig {
            block_tokens: BT,
            max_num_seqs: 4,
            rule: StepRule {
                max_batched_tokens: 24,
                ..StepRule::default()
            },
        },
        RManager::new(home_blocks, 0.0),
    );
    sched.add(0, prompt.to_vec(), steps);
    let vocab = home.config().vocab_size;
    let (mut logits_out, mut tokens) = (Vec::new(), Vec::new());
    let mut max_borrowed = 0;
    let mut next_peer = 0;
    while tokens.len() <= steps {
        // Spread the loan over the creditors, one block from each in turn.
        for (seq, n, _) in sched.shortfalls() {
            for _ in 0..n {
                let peer = next_peer % creditors;
                next_peer += 1;
                let blocks = ex.pools[peer].0.lend(("home".into(), seq), 1).unwrap();
                sched.add_borrowed(seq, peer as u16, &blocks);
            }
        }
        let step = sched.schedule();
        assert!(step.preempted.is_empty());
        max_borrowed = max_borrowed.max(sched.borrowed_blocks());
        let logits = home.forward(&mut kv, &step.input(), &mut ex).unwrap();
        if step.items[0].samples {
            let l = logits[..vocab].to_vec();
            let t = argmax(&l);
            logits_out.push(l);
            tokens.push(t);
            sched.append_token(0, t);
        }
    }
    (logits_out, tokens, max_borrowed)
}

#[test]
fn borrowed_blocks_on_one_to_three_creditors_give_the_same_logits_and_tokens() {
    let dir = tempfile::tempdir().unwrap();
    write_demo_model(dir.path(), &DemoModelSpec::default()).unwrap();
    let prompt: Vec<u32> = (0..70u32).map(|i| (i * 7919 + 3) % 1000).collect();
    let steps = 30;
    let (want_logits, want_tokens, borrowed) = run(dir.path(), &prompt, steps, 64, 1);
    assert_eq!(borrowed, 0, "the reference fits at home");
    for creditors in 1..=3 {
        // Two local blocks hold 32 of the 101 tokens: most of the context lives elsewhere.
        let (logits, tokens, borrowed) = run(dir.path(), &prompt, steps, 2, creditors);
        assert!(
            borrowed >= 5,
            "{creditors} creditors: only {borrowed} blocks borrowed"
        );
        for (step, (a, b)) in logits.iter().zip(&want_logits).enumerate() {
            let scale = b.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            let err = a
                .iter()
                .zip(b)
                .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
                / scale;
            assert!(
                err < 1e-4,
                "{creditors} creditors, step {step}: relative error {err:e}"
            );
        }
        assert_eq!(tokens, want_tokens, "{creditors} creditors");
    }
}
