//! What a peer frame may say, given this worker's KV cache. Every value a home sends (layer,
//! block ids, offsets, rows, lengths) is checked here, in the connection's reader thread,
//! before the engine sees the frame; the engine then checks that the blocks are lent to that
//! home and request (`RManager::check_lent`). So the backends, CPU or GPU, get only values
//! inside the cache, and a frame that lies costs its sender a `Failure`, never a panic here.
//!
//! Answers from creditors are checked the same way at the home: a partial of the wrong size
//! or a block of the wrong length ends the connection instead of reaching the merge.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use super::PeerMsg;
use crate::backend::KvShape;
use crate::dist_attention::{AttnCall, PartIn};

/// Bytes of an NCCL unique id (`LinkOffer`).
const LINK_ID_BYTES: usize = 128;
/// Room in a frame for what is not K/V or queries: refusal strings, ids, counts.
const FRAME_SLACK: usize = 64 << 10;

/// The cache and step geometry a frame is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLimits {
    pub kv: KvShape,
    pub q_heads: usize,
    /// Most query rows one attention call carries: the pool's `--max-batched-tokens` (every
    /// worker of a pool gets the same flags).
    pub max_rows: usize,
}

/// Why a frame was refused; `reason` is the metric's label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}")]
pub struct FrameError {
    pub reason: &'static str,
    pub what: String,
}

fn refuse(reason: &'static str, what: impl Into<String>) -> FrameError {
    FrameError {
        reason,
        what: what.into(),
    }
}

/// `Err` unless `value < bound`, naming the field.
fn below(reason: &'static str, field: &str, value: u64, bound: usize) -> Result<(), FrameError> {
    if value < bound as u64 {
        Ok(())
    } else {
        Err(refuse(
            reason,
            format!("{field} {value} is out of range (below {bound} here)"),
        ))
    }
}

fn length(field: &str, got: usize, want: usize) -> Result<(), FrameError> {
    if got == want {
        Ok(())
    } else {
        Err(refuse(
            "length",
            format!("{field} holds {got} values, not {want}"),
        ))
    }
}

impl FrameLimits {
    fn q_width(&self) -> usize {
        self.q_heads * self.kv.head_dim
    }

    fn kv_width(&self) -> usize {
        self.kv.kv_heads * self.kv.head_dim
    }

    /// Floats of one block, every layer, K and V: what `Fetched` and `Store` carry.
    pub fn block_values(&self) -> usize {
        2 * self.kv.layers * self.kv.block_floats()
    }

    /// The largest frame a peer of this geometry sends: an attention call of `max_rows` rows
    /// each with its new K/V, naming every block, or one block's K/V, plus slack.
    pub fn max_frame(&self) -> usize {
        let per_row = 4 * (self.q_width() + 2 * self.kv_width()) + 28 + 20;
        let attn = self.max_rows * per_row + 12 * self.kv.blocks;
        let block = 4 * self.block_values();
        attn.max(block) + 4 * self.kv.blocks + FRAME_SLACK
    }

    /// Checks what a home asks this worker (as its creditor).
    pub fn check_request(&self, msg: &PeerMsg) -> Result<(), FrameError> {
        let blocks = self.kv.blocks;
        match msg {
            // Any count: a home asks for all it lacks and gets what the lend cap allows, so
            // the grant, not the ask, bounds what this worker does.
            PeerMsg::Reserve { .. } | PeerMsg::Release { .. } => Ok(()),
            PeerMsg::ReleaseBlocks { blocks: ids, .. } => self.block_list(ids),
            PeerMsg::MoveBlocks { blocks: ids, .. } => {
                self.block_list(ids)?;
                let mut sorted = ids.clone();
                sorted.sort_unstable();
                sorted.dedup();
                if sorted.len() == ids.len() {
                    Ok(())
                } else {
                    Err(refuse("blocks", "a block is named twice in one move"))
                }
            }
            PeerMsg::Fetch { block, .. } => below("blocks", "block", u64::from(*block), blocks),
            PeerMsg::Store { block, data, .. } => {
                below("blocks", "block", u64::from(*block), blocks)?;
                length("the stored block", data.len(), self.block_values())
            }
            PeerMsg::Attn { attn, .. } => self.check_attn(attn),
            PeerMsg::LinkOffer { id } => length("the link id", id.len(), LINK_ID_BYTES),
            other => Err(unexpected(other, "a home")),
        }
    }

    /// Checks what a creditor answers this worker (as a home).
    pub fn check_reply(&self, msg: &PeerMsg) -> Result<(), FrameError> {
        match msg {
            PeerMsg::AttnOut { parts, .. } => {
                let mut rows = 0usize;
                for p in parts {
                    if p.lse.len() % self.q_heads != 0 {
                        return Err(refuse(
                            "length",
                            format!(
                                "a partial's log-sum-exp holds {} values, not a multiple of {} heads",
                                p.lse.len(),
                                self.q_heads
                            ),
                        ));
                    }
                    length(
                        "a partial's output",
                        p.o.len(),
                        p.lse.len() * self.kv.head_dim,
                    )?;
                    rows += p.lse.len() / self.q_heads;
                }
                below("rows", "rows answered", rows as u64, self.max_rows + 1)
            }
            PeerMsg::Fetched { data, .. } => {
                length("the fetched block", data.len(), self.block_values())
            }
            PeerMsg::Reserved { .. }
            | PeerMsg::Failure { .. }
            | PeerMsg::Stored { .. }
            | PeerMsg::Moved { .. }
            | PeerMsg::Reclaim
            | PeerMsg::Recall { .. }
            | PeerMsg::LinkAnswer { .. } => Ok(()),
            other => Err(unexpected(other, "a creditor")),
        }
    }

    fn block_list(&self, ids: &[u32]) -> Result<(), FrameError> {
        below(
            "blocks",
            "block count",
            ids.len() as u64,
            self.kv.blocks + 1,
        )?;
        ids.iter()
            .try_for_each(|&b| below("blocks", "block", u64::from(b), self.kv.blocks))
    }

    fn check_attn(&self, call: &AttnCall) -> Result<(), FrameError> {
        below("layer", "layer", u64::from(call.layer), self.kv.layers)?;
        let mut rows = 0u64;
        let mut segments = 0usize;
        for p in &call.parts {
            rows += u64::from(p.rows);
            segments += p.segments.len();
            // Checked as they add up: a part's own checks size nothing by its claims.
            below("rows", "rows in the call", rows, self.max_rows + 1)?;
            below(
                "blocks",
                "segments in the call",
                segments as u64,
                self.kv.blocks + 1,
            )?;
            self.check_part(p, call.linked)?;
        }
        Ok(())
    }

    fn check_part(&self, p: &PartIn, linked: bool) -> Result<(), FrameError> {
        let (bt, blocks) = (self.kv.block_tokens, self.kv.blocks);
        if p.rows == 0 {
            return Err(refuse("rows", "a part with no rows"));
        }
        if p.first_row_pos.checked_add(p.rows).is_none() {
            return Err(refuse("position", "row positions overflow"));
        }
        let q = if linked {
            0
        } else {
            p.rows as usize * self.q_width()
        };
        length("q", p.q.len(), q)?;
        for s in &p.segments {
            below("blocks", "segment block", u64::from(s.block), blocks)?;
            below("offset", "segment tokens", u64::from(s.tokens), bt + 1)?;
            if s.tokens == 0 || s.first_pos.checked_add(s.tokens).is_none() {
                return Err(refuse(
                    "position",
                    format!(
                        "a segment of {} tokens at position {}",
                        s.tokens, s.first_pos
                    ),
                ));
            }
        }
        below(
            "rows",
            "appends",
            p.appends.len() as u64,
            p.rows as usize + 1,
        )?;
        let kv = if linked { 0 } else { self.kv_width() };
        for a in &p.appends {
            below("rows", "append row", u64::from(a.row), p.rows as usize)?;
            below("blocks", "append block", u64::from(a.block), blocks)?;
            below("offset", "append offset", u64::from(a.offset), bt)?;
            length("an append's k", a.k.len(), kv)?;
            length("an append's v", a.v.len(), kv)?;
        }
        Ok(())
    }
}

fn unexpected(msg: &PeerMsg, from: &str) -> FrameError {
    let name = format!("{msg:?}");
    let kind = name.split([' ', '{', '(']).next().unwrap_or("?");
    refuse(
        "unexpected",
        format!("{kind} is not something {from} sends"),
    )
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabels {
    reason: &'static str,
}

/// Frames refused on the peer port, by reason (`ilm_peer_frames_rejected_total{reason}`):
/// bad values (`layer`, `blocks`, `offset`, `rows`, `position`, `length`), frames out of turn
/// (`unexpected`, `before_hello`), `too_large`, `malformed`, `unauthenticated`, `version`,
/// `hello_timeout`, `busy` (too many connections not yet authenticated), and blocks not lent to
/// the caller (`not_lent`). Cloning shares the counts.
#[derive(Clone, Default, Debug)]
pub struct Rejects(Family<RejectLabels, Counter>);

impl Rejects {
    pub fn count(&self, reason: &'static str) {
        self.0.get_or_create(&RejectLabels { reason }).inc();
    }

    /// The family, for the metrics registry.
    pub fn family(&self) -> Family<RejectLabels, Counter> {
        self.0.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::KvSegment;
    use crate::dist_attention::{Append, PartOut};

    fn limits() -> FrameLimits {
        FrameLimits {
            kv: KvShape {
                layers: 2,
                blocks: 8,
                block_tokens: 16,
                kv_heads: 2,
                head_dim: 4,
            },
            q_heads: 4,
            max_rows: 32,
        }
    }

    fn attn(edit: impl FnOnce(&mut AttnCall)) -> PeerMsg {
        let mut call = AttnCall {
            layer: 1,
            linked: false,
            parts: vec![PartIn {
                seq: 1,
                first_row_pos: 20,
                rows: 2,
                q: vec![0.0; 2 * 16],
                segments: vec![KvSegment {
                    block: 3,
                    first_pos: 16,
                    tokens: 5,
                }],
                appends: vec![Append {
                    row: 1,
                    block: 3,
                    offset: 5,
                    k: vec![0.0; 8],
                    v: vec![0.0; 8],
                }],
            }],
        };
        edit(&mut call);
        PeerMsg::Attn {
            call: 4,
            attn: call,
        }
    }

    #[test]
    fn a_well_formed_call_passes_and_each_bad_value_is_named() {
        let l = limits();
        assert_eq!(l.check_request(&attn(|_| {})), Ok(()));
        let cases: Vec<(&str, PeerMsg)> = vec![
            ("layer", attn(|c| c.layer = 2)),
            ("blocks", attn(|c| c.parts[0].segments[0].block = 8)),
            ("offset", attn(|c| c.parts[0].segments[0].tokens = 17)),
            ("position", attn(|c| c.parts[0].segments[0].tokens = 0)),
            ("position", attn(|c| c.parts[0].first_row_pos = u32::MAX)),
            ("offset", attn(|c| c.parts[0].appends[0].offset = 16)),
            ("rows", attn(|c| c.parts[0].appends[0].row = 2)),
            ("rows", attn(|c| c.parts[0].rows = 1000)),
            ("rows", attn(|c| c.parts[0].rows = 0)),
            ("length", attn(|c| c.parts[0].q.truncate(31))),
            ("length", attn(|c| c.parts[0].appends[0].k.push(1.0))),
            ("length", attn(|c| c.linked = true)),
            (
                "length",
                PeerMsg::Store {
                    call: 1,
                    seq: 1,
                    block: 2,
                    data: vec![0.0; 3],
                },
            ),
            (
                "blocks",
                PeerMsg::Fetch {
                    call: 1,
                    seq: 1,
                    block: 99,
                },
            ),
            (
                "blocks",
                PeerMsg::MoveBlocks {
                    call: 1,
                    seq: 1,
                    blocks: vec![1, 1],
                    fetch: true,
                },
            ),
            ("unexpected", PeerMsg::Reclaim),
            ("unexpected", PeerMsg::Stored { call: 1 }),
        ];
        for (reason, msg) in cases {
            let err = l.check_request(&msg).expect_err(&format!("{msg:?}"));
            assert_eq!(err.reason, reason, "{err} for {msg:?}");
        }
    }

    #[test]
    fn the_frame_cap_fits_the_largest_honest_frames() {
        let l = limits();
        let full = attn(|c| {
            let p = &mut c.parts[0];
            p.rows = 32;
            p.q = vec![0.0; 32 * 16];
            p.appends = (0..32)
                .map(|row| Append {
                    row,
                    block: 3,
                    offset: row % 16,
                    k: vec![0.0; 8],
                    v: vec![0.0; 8],
                })
                .collect();
        });
        let mut buf = Vec::new();
        full.write_to(&mut buf).unwrap();
        assert!(buf.len() <= l.max_frame());
        assert_eq!(l.check_request(&full), Ok(()));
        let store = PeerMsg::Store {
            call: 1,
            seq: 1,
            block: 2,
            data: vec![0.0; l.block_values()],
        };
        buf.clear();
        store.write_to(&mut buf).unwrap();
        assert!(buf.len() <= l.max_frame());
    }

    #[test]
    fn replies_of_the_wrong_size_are_refused() {
        let l = limits();
        let out = |o: usize, lse: usize| PeerMsg::AttnOut {
            call: 1,
            parts: vec![PartOut {
                o: vec![0.0; o],
                lse: vec![0.0; lse],
            }],
        };
        assert_eq!(l.check_reply(&out(2 * 16, 8)), Ok(()));
        assert!(l.check_reply(&out(2 * 16, 7)).is_err());
        assert!(l.check_reply(&out(2 * 16 - 1, 8)).is_err());
        assert!(
            l.check_reply(&PeerMsg::Fetched {
                call: 1,
                data: vec![0.0; 5]
            })
            .is_err()
        );
        assert!(l.check_reply(&PeerMsg::Release { seq: 1 }).is_err());
    }
}
