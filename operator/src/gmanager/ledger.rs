//! The gManager's ledger of one cluster: which workers are members, what their pools last
//! held, and the membership epoch. Pure logic: every call takes `now`, so tests drive time.
//!
//! The ledger is soft state rebuilt from what workers report: nothing here is authoritative
//! about a block, it only steers homes towards creditors likely to say yes.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use infinite_llm_protocol::gmanager::{
    BorrowAdvice, BorrowRequest, Creditor, PoolFigures, PoolView, Register, WorkerView,
};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    #[error("worker {0:?} is not registered (register again)")]
    UnknownWorker(String),
    #[error("worker_id must not be empty")]
    EmptyWorkerId,
    #[error("block_tokens must be positive")]
    ZeroBlockTokens,
    #[error("worker uses {worker} tokens per block but the cluster uses {cluster}")]
    BlockTokensMismatch { worker: u32, cluster: u32 },
}

#[derive(Debug, Clone)]
struct Member {
    api_url: String,
    peer_addr: String,
    block_tokens: u32,
    pool: PoolFigures,
    last_seen: Instant,
}

#[derive(Debug)]
pub struct Ledger {
    epoch: u64,
    /// A worker silent for this long is gone.
    expiry: Duration,
    members: BTreeMap<String, Member>,
}

impl Ledger {
    pub fn new(expiry: Duration) -> Self {
        Ledger {
            epoch: 0,
            expiry,
            members: BTreeMap::new(),
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Adds the worker, or replaces it when its id is already known (a restarted worker has
    /// lost its blocks, so its old figures must go). Either way membership changes.
    pub fn register(&mut self, r: Register, now: Instant) -> Result<u64, LedgerError> {
        if r.worker_id.is_empty() {
            return Err(LedgerError::EmptyWorkerId);
        }
        if r.block_tokens == 0 {
            return Err(LedgerError::ZeroBlockTokens);
        }
        // Blocks of different sizes cannot hold each other's KV.
        if let Some(cluster) = self.block_tokens_except(&r.worker_id)
            && cluster != r.block_tokens
        {
            return Err(LedgerError::BlockTokensMismatch {
                worker: r.block_tokens,
                cluster,
            });
        }
        self.members.insert(
            r.worker_id,
            Member {
                api_url: r.api_url,
                peer_addr: r.peer_addr,
                block_tokens: r.block_tokens,
                pool: r.pool,
                last_seen: now,
            },
        );
        self.epoch += 1;
        Ok(self.epoch)
    }

    /// Records a worker's latest figures; the epoch it reports needs no reply beyond ours.
    pub fn heartbeat(
        &mut self,
        id: &str,
        pool: PoolFigures,
        now: Instant,
    ) -> Result<u64, LedgerError> {
        let member = self
            .members
            .get_mut(id)
            .ok_or_else(|| LedgerError::UnknownWorker(id.to_owned()))?;
        member.pool = pool;
        member.last_seen = now;
        Ok(self.epoch)
    }

    pub fn leave(&mut self, id: &str) -> Result<u64, LedgerError> {
        self.members
            .remove(id)
            .ok_or_else(|| LedgerError::UnknownWorker(id.to_owned()))?;
        self.epoch += 1;
        Ok(self.epoch)
    }

    /// Drops every worker silent for the expiry or longer, one epoch per worker, and
    /// returns their ids.
    pub fn expire(&mut self, now: Instant) -> Vec<String> {
        let expiry = self.expiry;
        let gone: Vec<String> = self
            .members
            .iter()
            .filter(|(_, m)| now.saturating_duration_since(m.last_seen) >= expiry)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &gone {
            self.members.remove(id);
            self.epoch += 1;
        }
        gone
    }

    /// Creditors for `req.home`: live workers other than the home with something to lend,
    /// most lendable blocks first (ties by id, so advice is stable).
    pub fn advise(&self, req: &BorrowRequest, now: Instant) -> Result<BorrowAdvice, LedgerError> {
        if !self.live(now).any(|(id, _)| id == &req.home) {
            return Err(LedgerError::UnknownWorker(req.home.clone()));
        }
        let mut creditors: Vec<Creditor> = self
            .live(now)
            .filter(|(id, m)| *id != &req.home && m.pool.lendable_blocks() > 0)
            .map(|(id, m)| Creditor {
                worker_id: id.clone(),
                peer_addr: m.peer_addr.clone(),
                lendable_blocks: m.pool.lendable_blocks(),
            })
            .collect();
        creditors.sort_by(|a, b| {
            b.lendable_blocks
                .cmp(&a.lendable_blocks)
                .then_with(|| a.worker_id.cmp(&b.worker_id))
        });
        Ok(BorrowAdvice {
            epoch: self.epoch,
            creditors,
        })
    }

    /// Live workers and their summed figures. `block_tokens` is 0 while no worker is live.
    pub fn view(&self, now: Instant) -> PoolView {
        let mut totals = PoolFigures::default();
        let mut block_tokens = 0;
        let workers = self
            .live(now)
            .map(|(id, m)| {
                add(&mut totals, &m.pool);
                block_tokens = m.block_tokens;
                WorkerView {
                    worker_id: id.clone(),
                    api_url: m.api_url.clone(),
                    peer_addr: m.peer_addr.clone(),
                    pool: m.pool,
                    free_blocks: m.pool.free_blocks(),
                    last_seen_ms: millis(now.saturating_duration_since(m.last_seen)),
                }
            })
            .collect();
        PoolView {
            epoch: self.epoch,
            block_tokens,
            workers,
            totals,
        }
    }

    /// Members not yet past their expiry, even if no sweep has removed the others yet.
    fn live(&self, now: Instant) -> impl Iterator<Item = (&String, &Member)> {
        self.members
            .iter()
            .filter(move |(_, m)| now.saturating_duration_since(m.last_seen) < self.expiry)
    }

    fn block_tokens_except(&self, id: &str) -> Option<u32> {
        self.members
            .iter()
            .find(|(other, _)| *other != id)
            .map(|(_, m)| m.block_tokens)
    }
}

fn add(sum: &mut PoolFigures, p: &PoolFigures) {
    sum.total_blocks += p.total_blocks;
    sum.used_blocks += p.used_blocks;
    sum.lent_blocks += p.lent_blocks;
    sum.borrowed_blocks += p.borrowed_blocks;
    sum.lend_cap_blocks += p.lend_cap_blocks;
    sum.running_requests += p.running_requests;
    sum.waiting_requests += p.waiting_requests;
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXPIRY: Duration = Duration::from_millis(300);

    fn pool(total: u64, used: u64, lent: u64, cap: u64) -> PoolFigures {
        PoolFigures {
            total_blocks: total,
            used_blocks: used,
            lent_blocks: lent,
            lend_cap_blocks: cap,
            ..Default::default()
        }
    }

    fn reg(id: &str, pool: PoolFigures) -> Register {
        Register {
            worker_id: id.into(),
            api_url: format!("http://{id}:8000"),
            peer_addr: format!("{id}:9000"),
            block_tokens: 16,
            pool,
        }
    }

    fn ask(home: &str) -> BorrowRequest {
        BorrowRequest {
            home: home.into(),
            blocks: 4,
        }
    }

    fn ids(advice: &BorrowAdvice) -> Vec<&str> {
        advice
            .creditors
            .iter()
            .map(|c| c.worker_id.as_str())
            .collect()
    }

    #[test]
    fn every_join_and_leave_bumps_the_epoch() {
        let t = Instant::now();
        let mut l = Ledger::new(EXPIRY);
        assert_eq!(l.epoch(), 0);
        assert_eq!(l.register(reg("a", pool(8, 0, 0, 4)), t), Ok(1));
        assert_eq!(l.register(reg("b", pool(8, 0, 0, 4)), t), Ok(2));
        assert_eq!(l.leave("a"), Ok(3));
        assert_eq!(l.leave("a"), Err(LedgerError::UnknownWorker("a".into())));
        assert_eq!(l.epoch(), 3, "a refused leave changes nothing");
    }

    #[test]
    fn heartbeats_keep_the_epoch_and_update_figures() {
        let t = Instant::now();
        let mut l = Ledger::new(EXPIRY);
        l.register(reg("a", pool(8, 0, 0, 4)), t).unwrap();
        assert_eq!(
            l.heartbeat("a", pool(8, 5, 1, 4), t + Duration::from_millis(10)),
            Ok(1)
        );
        let v = l.view(t + Duration::from_millis(30));
        assert_eq!(v.workers[0].pool, pool(8, 5, 1, 4));
        assert_eq!(v.workers[0].free_blocks, 2);
        assert_eq!(v.workers[0].last_seen_ms, 20);
    }

    #[test]
    fn heartbeat_from_an_unknown_worker_is_refused() {
        let mut l = Ledger::new(EXPIRY);
        assert_eq!(
            l.heartbeat("ghost", PoolFigures::default(), Instant::now()),
            Err(LedgerError::UnknownWorker("ghost".into()))
        );
        assert_eq!(l.epoch(), 0);
    }

    #[test]
    fn re_registering_replaces_the_worker_and_bumps_the_epoch() {
        let t = Instant::now();
        let mut l = Ledger::new(EXPIRY);
        l.register(reg("a", pool(8, 6, 2, 4)), t).unwrap();
        let mut again = reg("a", pool(16, 0, 0, 8));
        again.peer_addr = "new:9000".into();
        assert_eq!(l.register(again, t), Ok(2));
        let v = l.view(t);
        assert_eq!(v.workers.len(), 1);
        assert_eq!(v.workers[0].peer_addr, "new:9000");
        assert_eq!(v.workers[0].pool, pool(16, 0, 0, 8));
        assert_eq!(v.totals.total_blocks, 16);
    }

    #[test]
    fn registration_is_validated() {
        let t = Instant::now();
        let mut l = Ledger::new(EXPIRY);
        assert_eq!(
            l.register(reg("", PoolFigures::default()), t),
            Err(LedgerError::EmptyWorkerId)
        );
        let mut zero = reg("a", PoolFigures::default());
        zero.block_tokens = 0;
        assert_eq!(l.register(zero, t), Err(LedgerError::ZeroBlockTokens));
        l.register(reg("a", PoolFigures::default()), t).unwrap();
        let mut odd = reg("b", PoolFigures::default());
        odd.block_tokens = 32;
        assert_eq!(
            l.register(odd.clone(), t),
            Err(LedgerError::BlockTokensMismatch {
                worker: 32,
                cluster: 16
            })
        );
        odd.worker_id = "a".into();
        assert_eq!(
            l.register(odd, t),
            Ok(2),
            "the only member may come back with another block size"
        );
        assert_eq!(l.view(t).block_tokens, 32);
    }

    #[test]
    fn creditors_come_most_lendable_first_without_the_home() {
        let t = Instant::now();
        let mut l = Ledger::new(EXPIRY);
        l.register(reg("home", pool(100, 0, 0, 100)), t).unwrap();
        l.register(reg("small", pool(10, 7, 0, 10)), t).unwrap(); // 3 lendable
        l.register(reg("capped", pool(100, 0, 45, 50)), t).unwrap(); // 5: the cap binds
        l.register(reg("big", pool(100, 10, 0, 50)), t).unwrap(); // 50
        l.register(reg("tie", pool(10, 7, 0, 10)), t).unwrap(); // 3, ties "small"
        let advice = l.advise(&ask("home"), t).unwrap();
        assert_eq!(ids(&advice), ["big", "capped", "small", "tie"]);
        assert_eq!(
            advice
                .creditors
                .iter()
                .map(|c| c.lendable_blocks)
                .collect::<Vec<_>>(),
            [50, 5, 3, 3]
        );
        assert_eq!(advice.creditors[0].peer_addr, "big:9000");
        assert_eq!(advice.epoch, 5);
    }

    #[test]
    fn workers_with_nothing_to_lend_are_never_advised() {
        let t = Instant::now();
        let mut l = Ledger::new(EXPIRY);
        l.register(reg("home", pool(8, 8, 0, 4)), t).unwrap();
        l.register(reg("full", pool(8, 8, 0, 4)), t).unwrap();
        l.register(reg("at_cap", pool(8, 0, 4, 4)), t).unwrap();
        l.register(reg("no_cap", pool(8, 0, 0, 0)), t).unwrap();
        assert!(l.advise(&ask("home"), t).unwrap().creditors.is_empty());
    }

    #[test]
    fn advice_for_an_unknown_home_is_refused() {
        let t = Instant::now();
        let mut l = Ledger::new(EXPIRY);
        l.register(reg("a", pool(8, 0, 0, 4)), t).unwrap();
        assert_eq!(
            l.advise(&ask("ghost"), t),
            Err(LedgerError::UnknownWorker("ghost".into()))
        );
    }

    #[test]
    fn silent_workers_expire_one_epoch_each() {
        let t = Instant::now();
        let mut l = Ledger::new(EXPIRY);
        l.register(reg("a", pool(8, 0, 0, 4)), t).unwrap();
        l.register(reg("b", pool(8, 0, 0, 4)), t).unwrap();
        l.register(reg("c", pool(8, 0, 0, 4)), t).unwrap();
        let beat = pool(8, 0, 0, 4);
        l.heartbeat("c", beat, t + Duration::from_millis(200))
            .unwrap();
        assert!(l.expire(t + EXPIRY - Duration::from_millis(1)).is_empty());
        assert_eq!(l.expire(t + EXPIRY), ["a", "b"]);
        assert_eq!(l.epoch(), 5);
        assert_eq!(
            l.heartbeat("a", beat, t + EXPIRY),
            Err(LedgerError::UnknownWorker("a".into())),
            "an expired worker must register again"
        );
        assert_eq!(l.view(t + EXPIRY).workers.len(), 1);
    }

    #[test]
    fn expired_but_unswept_workers_are_neither_advised_nor_shown() {
        let t = Instant::now();
        let mut l = Ledger::new(EXPIRY);
        l.register(reg("stale", pool(8, 0, 0, 8)), t).unwrap();
        let later = t + Duration::from_millis(250);
        l.register(reg("home", pool(8, 8, 0, 0)), later).unwrap();
        l.register(reg("fresh", pool(8, 6, 0, 8)), later).unwrap();
        let now = t + EXPIRY;
        assert_eq!(ids(&l.advise(&ask("home"), now).unwrap()), ["fresh"]);
        let v = l.view(now);
        assert_eq!(
            v.workers
                .iter()
                .map(|w| w.worker_id.as_str())
                .collect::<Vec<_>>(),
            ["fresh", "home"]
        );
        assert_eq!(v.totals.total_blocks, 16);
        assert_eq!(
            l.advise(&ask("stale"), now),
            Err(LedgerError::UnknownWorker("stale".into())),
            "an expired home must register again too"
        );
    }

    #[test]
    fn totals_sum_every_live_worker() {
        let t = Instant::now();
        let mut l = Ledger::new(EXPIRY);
        let mut a = pool(10, 4, 2, 5);
        a.borrowed_blocks = 3;
        a.running_requests = 2;
        let mut b = pool(20, 1, 3, 10);
        b.borrowed_blocks = 1;
        b.waiting_requests = 4;
        l.register(reg("a", a), t).unwrap();
        l.register(reg("b", b), t).unwrap();
        let v = l.view(t);
        assert_eq!(v.epoch, 2);
        assert_eq!(v.block_tokens, 16);
        assert_eq!(
            v.totals,
            PoolFigures {
                total_blocks: 30,
                used_blocks: 5,
                lent_blocks: 5,
                borrowed_blocks: 4,
                lend_cap_blocks: 15,
                running_requests: 2,
                waiting_requests: 4,
            }
        );
        assert_eq!(v.totals.free_blocks(), 20);
    }

    #[test]
    fn an_empty_ledger_has_an_empty_view() {
        let v = Ledger::new(EXPIRY).view(Instant::now());
        assert_eq!(v.epoch, 0);
        assert_eq!(v.block_tokens, 0);
        assert!(v.workers.is_empty());
        assert_eq!(v.totals, PoolFigures::default());
    }
}
