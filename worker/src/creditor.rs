//! This worker as a creditor: it answers the homes that borrow its blocks. Reservations and
//! releases need only the rManager; attention and block copies need the KV cache, and are
//! checked first against what was lent to that home for that request.

use std::time::Duration;

use crate::backend::Backend;
use crate::dist_attention::{AttnCall, PartOut};
use crate::model::llama::Llama;
use crate::peer::{Incoming, PeerMsg, Responder};
use crate::rmanager::RManager;
use crate::scheduler::{Scheduler, SeqId};

/// A creditor that does not answer within this long is treated as lost for the call.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(5);
/// What the engine must do with a request from a home after the pool-only ones are handled:
/// the work that needs the KV cache.
pub enum KvWork {
    Attn {
        call: u64,
        attn: AttnCall,
        reply: Responder,
    },
    /// A home migrating a block away from here: read it.
    Fetch {
        call: u64,
        block: u32,
        reply: Responder,
    },
    /// A home migrating a block here: write it.
    Store {
        call: u64,
        block: u32,
        data: Vec<f32>,
        reply: Responder,
    },
    /// A home migrating blocks over the direct link: send them (`fetch`) or receive them.
    Move {
        call: u64,
        blocks: Vec<u32>,
        fetch: bool,
        reply: Responder,
    },
}

/// Frees what a home whose connection closed still borrowed here.
pub fn take_back_loans(rm: &mut RManager, from: &str) {
    let blocks = rm.take_back_all(from);
    if blocks > 0 {
        tracing::info!(home = %from, blocks, "a home went away; its loans are taken back");
    }
}

/// Answers what a creditor can answer from its pool alone; returns the work that needs the
/// KV cache.
pub fn serve_pool_request(
    rm: &mut RManager,
    from: String,
    msg: PeerMsg,
    reply: Responder,
) -> Option<KvWork> {
    match msg {
        PeerMsg::Reserve { call, seq, blocks } => {
            let answer = match rm.lend_up_to((from.clone(), seq), blocks as usize) {
                Ok(blocks) => PeerMsg::Reserved {
                    call,
                    blocks,
                    refusal: String::new(),
                },
                Err(e) => PeerMsg::Reserved {
                    call,
                    blocks: Vec::new(),
                    refusal: e.to_string(),
                },
            };
            reply.send(&answer);
            None
        }
        PeerMsg::Release { seq } => {
            rm.take_back(&(from, seq));
            None
        }
        PeerMsg::ReleaseBlocks { seq, blocks } => {
            if let Err(e) = rm.take_back_blocks(&(from.clone(), seq), &blocks) {
                tracing::warn!(home = %from, error = %e, "release of moved blocks refused");
            }
            None
        }
        PeerMsg::Fetch { call, seq, block } => {
            let work = KvWork::Fetch { call, block, reply };
            lent_for(rm, from, seq, [block], work)
        }
        PeerMsg::Store {
            call,
            seq,
            block,
            data,
        } => {
            let work = KvWork::Store {
                call,
                block,
                data,
                reply,
            };
            lent_for(rm, from, seq, [block], work)
        }
        PeerMsg::MoveBlocks {
            call,
            seq,
            blocks,
            fetch,
        } => {
            let lent = blocks.clone();
            let work = KvWork::Move {
                call,
                blocks,
                fetch,
                reply,
            };
            lent_for(rm, from, seq, lent, work)
        }
        PeerMsg::Attn { call, attn } => {
            // A creditor touches only blocks it lent to this home for this request.
            for p in &attn.parts {
                let blocks = p
                    .segments
                    .iter()
                    .map(|s| s.block)
                    .chain(p.appends.iter().map(|a| a.block));
                if let Err(e) = rm.check_lent(&(from.clone(), p.seq), blocks) {
                    reply.refuse(call, e.to_string(), "not_lent");
                    return None;
                }
            }
            Some(KvWork::Attn { call, attn, reply })
        }
        other => {
            tracing::warn!(home = %from, msg = ?std::mem::discriminant(&other), "unexpected request from a home");
            None
        }
    }
}

/// A creditor's answer to an attention call: its partials (none when they went over the
/// direct link), or why it has none.
pub fn attn_answer(call: u64, answer: Result<Vec<PartOut>, String>) -> PeerMsg {
    match answer {
        Ok(parts) => PeerMsg::AttnOut { call, parts },
        Err(message) => PeerMsg::Failure { call, message },
    }
}

/// `work` if every block is lent to `from` for `seq`; otherwise the home gets a `Failure`.
fn lent_for(
    rm: &RManager,
    from: String,
    seq: SeqId,
    blocks: impl IntoIterator<Item = u32>,
    work: KvWork,
) -> Option<KvWork> {
    match rm.check_lent(&(from, seq), blocks) {
        Ok(()) => Some(work),
        Err(e) => {
            let (KvWork::Attn { call, reply, .. }
            | KvWork::Fetch { call, reply, .. }
            | KvWork::Store { call, reply, .. }
            | KvWork::Move { call, reply, .. }) = work;
            reply.refuse(call, e.to_string(), "not_lent");
            None
        }
    }
}

/// Answers a home that asks this worker, as a creditor.
pub(crate) fn serve_home<B: Backend>(
    model: &Llama<B>,
    kv: &mut B::Kv,
    scheduler: &mut Scheduler,
    m: Incoming,
) {
    match m {
        Incoming::Request { from, msg, reply } => {
            if let Some(work) = serve_pool_request(scheduler.rmanager_mut(), from, msg, reply) {
                serve_kv(model, kv, scheduler.block_tokens(), work);
            }
        }
        // What needs the link (lost creditors, reclaims) was taken out before.
        Incoming::Reply { peer, .. } | Incoming::Lost { peer, .. } => {
            tracing::debug!(peer, "late message from a creditor dropped")
        }
        Incoming::Gone { from } => take_back_loans(scheduler.rmanager_mut(), &from),
    }
}

/// Does the work of a home's request that needs the KV cache.
pub(crate) fn serve_kv<B: Backend>(
    model: &Llama<B>,
    kv: &mut B::Kv,
    block_tokens: usize,
    work: KvWork,
) {
    match work {
        KvWork::Attn { call, attn, reply } => {
            let answer = model.serve_attention(kv, &attn, reply.link().as_ref());
            reply.send(&attn_answer(call, answer));
        }
        KvWork::Fetch { call, block, reply } => {
            let data = model.backend().kv_read_block(kv, block);
            reply.send(&PeerMsg::Fetched { call, data });
        }
        KvWork::Store {
            call,
            block,
            data,
            reply,
        } => {
            let shape = model.kv_shape(1, block_tokens);
            let n = 2 * shape.layers * shape.block_floats();
            if data.len() == n {
                model.backend().kv_write_block(kv, block, &data);
                reply.send(&PeerMsg::Stored { call });
            } else {
                reply.send(&PeerMsg::Failure {
                    call,
                    message: format!("a stored block has {} values, not {n}", data.len()),
                });
            }
        }
        KvWork::Move {
            call,
            blocks,
            fetch,
            reply,
        } => {
            let backend = model.backend();
            let moved = match reply.link() {
                // The home has queued its side: this side completes the pair at once.
                // A failure aborts the link (in the group or in the wait).
                Some(link) => backend
                    .link_move(&link, kv, &blocks, fetch)
                    .and_then(|()| backend.link_move_wait(&link, PEER_TIMEOUT))
                    .map_err(|e| e.to_string()),
                None => Err("no direct link to this home".to_owned()),
            };
            match moved {
                Ok(()) => reply.send(&PeerMsg::Moved { call }),
                Err(message) => {
                    tracing::warn!(error = %message, "a block move over the direct link failed");
                    reply.send(&PeerMsg::Failure { call, message });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};

    use super::*;

    /// A responder on a real loopback connection, and the home's end to read answers from.
    fn responder() -> (Responder, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let home = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (creditor, _) = listener.accept().unwrap();
        (Responder::new(creditor), home)
    }

    fn move_blocks(seq: SeqId, blocks: Vec<u32>) -> PeerMsg {
        PeerMsg::MoveBlocks {
            call: 7,
            seq,
            blocks,
            fetch: true,
        }
    }

    #[test]
    fn a_creditor_moves_only_blocks_lent_to_that_home_and_request() {
        let mut rm = RManager::new(8, 1.0);
        let lent = rm.lend_up_to(("w1".into(), 1), 3).unwrap();
        let other = rm.lend_up_to(("w2".into(), 1), 1).unwrap();

        let (reply, _home) = responder();
        let work = serve_pool_request(&mut rm, "w1".into(), move_blocks(1, lent.clone()), reply);
        match work {
            Some(KvWork::Move { blocks, fetch, .. }) => {
                assert_eq!((blocks, fetch), (lent.clone(), true));
            }
            _ => panic!("a move of lent blocks is work for the KV cache"),
        }

        for (home, seq, blocks) in [("w1", 1, other.clone()), ("w1", 2, lent.clone())] {
            let (reply, mut at_home) = responder();
            let msg = move_blocks(seq, blocks);
            assert!(serve_pool_request(&mut rm, home.into(), msg, reply).is_none());
            match PeerMsg::read_from(&mut at_home).unwrap() {
                PeerMsg::Failure { call, message } => {
                    assert_eq!(call, 7);
                    assert!(message.contains("not lent"), "{message}");
                }
                other => panic!("expected a failure, got {other:?}"),
            }
        }
    }
}
