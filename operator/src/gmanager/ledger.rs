//! The gManager's ledger of one cluster: which workers are members, what their pools last
//! held, where each request keeps its blocks (the debt ledger, summed from the placement deltas
//! homes report), and the membership epoch. Pure logic: every call takes `now`, so tests drive
//! time.
//!
//! The ledger is soft state rebuilt from what workers report: nothing here is authoritative
//! about a block, it only steers homes towards creditors likely to say yes.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use infinite_llm_protocol::gmanager::{
    BorrowAdvice, BorrowRequest, Creditor, Debt, EpochChange, PlacementDelta, PlannedMove,
    PoolFigures, PoolView, Register, WorkerView,
};

use super::placement::{self, Instance, PlacementConfig, Role};

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
    #[error("request {request} holds fewer blocks on {holder:?} than the placement removes")]
    PlacementUnderflow { request: u64, holder: String },
}

#[derive(Debug, Clone)]
struct Member {
    api_url: String,
    peer_addr: String,
    block_tokens: u32,
    pool: PoolFigures,
    last_seen: Instant,
    /// Blocks its requests migrated since it started, as last reported.
    migrated_blocks: u64,
}

/// A planned move handed to its home, until the home's placements show it done.
#[derive(Debug, Clone)]
struct InFlight {
    planned: PlannedMove,
    since: Instant,
}

/// A handed move whose placements never showed it done is forgotten after this long (the
/// home found no room, or the request ended), so a later round may plan it again.
const IN_FLIGHT_FOR: Duration = Duration::from_secs(10);
/// Membership changes kept for the view.
const EPOCH_HISTORY: usize = 16;

/// Blocks of one request by holder, the home included.
type Holders = BTreeMap<String, u64>;

#[derive(Debug)]
pub struct Ledger {
    epoch: u64,
    /// A worker silent for this long is gone.
    expiry: Duration,
    members: BTreeMap<String, Member>,
    /// Where each (home, request) keeps its blocks.
    placements: BTreeMap<(String, u64), Holders>,
    placement: PlacementConfig,
    /// Moves of the last placement round.
    planned: Vec<PlannedMove>,
    /// Moves of the last round not handed to their homes yet.
    to_hand: Vec<PlannedMove>,
    in_flight: Vec<InFlight>,
    history: VecDeque<EpochChange>,
}

impl Ledger {
    pub fn new(expiry: Duration, placement: PlacementConfig) -> Self {
        Ledger {
            epoch: 0,
            expiry,
            members: BTreeMap::new(),
            placements: BTreeMap::new(),
            placement,
            planned: Vec::new(),
            to_hand: Vec::new(),
            in_flight: Vec::new(),
            history: VecDeque::new(),
        }
    }

    /// Moves the epoch on for a membership change, and remembers why.
    fn bump(&mut self, worker: &str, change: &str) {
        self.epoch += 1;
        if self.history.len() == EPOCH_HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(EpochChange {
            epoch: self.epoch,
            worker: worker.to_owned(),
            change: change.to_owned(),
        });
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Counts on from `epoch` when it is ahead: the epoch a previous gManager reached.
    pub fn continue_from(&mut self, epoch: u64) {
        self.epoch = self.epoch.max(epoch);
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
        self.forget(&r.worker_id);
        let id = r.worker_id.clone();
        self.members.insert(
            r.worker_id,
            Member {
                api_url: r.api_url,
                peer_addr: r.peer_addr,
                block_tokens: r.block_tokens,
                pool: r.pool,
                last_seen: now,
                migrated_blocks: 0,
            },
        );
        self.bump(&id, "joined");
        Ok(self.epoch)
    }

    /// Records a worker's latest figures and the placement changes of its requests since its
    /// last heartbeat, all or nothing; the epoch it reports needs no reply beyond ours.
    /// Removing blocks from a holder that has left is accepted and changes nothing: the ledger
    /// wrote those blocks off when the holder went. Placing blocks on one is refused.
    pub fn heartbeat(
        &mut self,
        id: &str,
        pool: PoolFigures,
        deltas: &[PlacementDelta],
        now: Instant,
    ) -> Result<u64, LedgerError> {
        if !self.members.contains_key(id) {
            return Err(LedgerError::UnknownWorker(id.to_owned()));
        }
        // A heartbeat carries every change since the last one: only its net per holder counts.
        let mut net: BTreeMap<(u64, &str), i64> = BTreeMap::new();
        for d in deltas {
            *net.entry((d.request, d.holder.as_str())).or_insert(0) += d.blocks;
        }
        let mut changed = Vec::with_capacity(net.len());
        for ((request, holder), blocks) in net {
            if !self.members.contains_key(holder) {
                if blocks > 0 {
                    return Err(LedgerError::UnknownWorker(holder.to_owned()));
                }
                continue;
            }
            let next = self
                .held(id, request, holder)
                .checked_add_signed(blocks)
                .ok_or_else(|| LedgerError::PlacementUnderflow {
                    request,
                    holder: holder.to_owned(),
                })?;
            changed.push(((request, holder), next));
        }
        for &((request, holder), next) in &changed {
            // Blocks arriving where a handed move sends them: that move is done.
            if next > self.held(id, request, holder) {
                self.in_flight.retain(|f| {
                    let m = &f.planned;
                    !(m.from == id && m.request == request && m.to == holder)
                });
            }
        }
        for ((request, holder), blocks) in changed {
            let key = (id.to_owned(), request);
            let holders = self.placements.entry(key.clone()).or_default();
            if blocks == 0 {
                holders.remove(holder);
            } else {
                holders.insert(holder.to_owned(), blocks);
            }
            if holders.is_empty() {
                self.placements.remove(&key);
            }
        }
        let member = self.members.get_mut(id).expect("checked above");
        member.pool = pool;
        member.last_seen = now;
        Ok(self.epoch)
    }

    pub fn leave(&mut self, id: &str) -> Result<u64, LedgerError> {
        self.members
            .remove(id)
            .ok_or_else(|| LedgerError::UnknownWorker(id.to_owned()))?;
        self.forget(id);
        self.bump(id, "left");
        Ok(self.epoch)
    }

    /// Records the blocks a worker's requests migrated since it started.
    pub fn report_migrated(&mut self, id: &str, blocks: u64) {
        if let Some(m) = self.members.get_mut(id) {
            m.migrated_blocks = blocks;
        }
    }

    /// The moves of the last round for `home`'s requests, each handed out once; they stay in
    /// flight until the home's placements show them done.
    pub fn take_moves(&mut self, home: &str, now: Instant) -> Vec<PlannedMove> {
        let (mine, rest) = std::mem::take(&mut self.to_hand)
            .into_iter()
            .partition(|m| m.from == home);
        self.to_hand = rest;
        self.in_flight
            .extend(mine.iter().cloned().map(|planned| InFlight {
                planned,
                since: now,
            }));
        mine
    }

    /// Blocks of the home's request on `holder`, as reported.
    fn held(&self, home: &str, request: u64, holder: &str) -> u64 {
        self.placements
            .get(&(home.to_owned(), request))
            .and_then(|h| h.get(holder))
            .copied()
            .unwrap_or(0)
    }

    /// Drops a departed worker's requests and the blocks it held for others: both are gone
    /// with it, and the homes that lost blocks report their recomputed placement afresh.
    fn forget(&mut self, id: &str) {
        self.placements.retain(|(home, _), holders| {
            holders.remove(id);
            home != id && !holders.is_empty()
        });
        self.to_hand.retain(|m| m.from != id && m.to != id);
        self.in_flight
            .retain(|f| f.planned.from != id && f.planned.to != id);
    }

    #[cfg(test)]
    pub(super) fn placements(&self) -> &BTreeMap<(String, u64), Holders> {
        &self.placements
    }

    /// Blocks each home holds on each other worker, summed over its requests.
    pub fn debts(&self) -> BTreeMap<(String, String), u64> {
        let mut debts = BTreeMap::new();
        for ((home, _), holders) in &self.placements {
            for (holder, &blocks) in holders {
                if holder != home {
                    *debts.entry((home.clone(), holder.clone())).or_insert(0) += blocks;
                }
            }
        }
        debts
    }

    /// Live workers as placement sees them, in id order. Figures a heartbeat does not carry
    /// are estimated: every block held is taken as full, and the next waiting request as
    /// needing the blocks of an average running one.
    fn instances(&self, now: Instant) -> (Vec<&String>, Vec<Instance>) {
        let (ids, members): (Vec<&String>, Vec<&Member>) = self.live(now).unzip();
        let instances = ids
            .iter()
            .zip(&members)
            .map(|(id, m)| {
                let p = &m.pool;
                let requests = self
                    .placements
                    .range(((*id).clone(), 0)..=((*id).clone(), u64::MAX))
                    .map(|((_, request), holders)| {
                        (*request, holders.get(id.as_str()).copied().unwrap_or(0))
                    })
                    .collect();
                Instance {
                    total_blocks: p.total_blocks,
                    used_blocks: p.used_blocks,
                    lent_blocks: p.lent_blocks,
                    lend_cap_blocks: p.lend_cap_blocks,
                    batch: p.running_requests,
                    waiting: p.waiting_requests,
                    next_need_blocks: p.used_blocks.div_ceil(p.running_requests.max(1)).max(1),
                    attention_tokens: (p.used_blocks + p.lent_blocks) * u64::from(m.block_tokens),
                    remote: p.borrowed_blocks > 0,
                    requests,
                }
            })
            .collect();
        (ids, instances)
    }

    /// Runs one round of the greedy placement over the live workers and keeps its moves for
    /// the view.
    pub fn place(&mut self, now: Instant) -> &[PlannedMove] {
        let (ids, instances) = self.instances(now);
        let block_tokens = u64::from(ids.first().map_or(0, |id| self.members[*id].block_tokens));
        let planned: Vec<PlannedMove> =
            placement::plan_moves(&instances, block_tokens, &self.placement)
                .into_iter()
                .map(|m| PlannedMove {
                    request: m.request,
                    from: ids[m.from].clone(),
                    to: ids[m.to].clone(),
                    blocks: m.blocks,
                })
                .collect();
        self.in_flight
            .retain(|f| now.saturating_duration_since(f.since) < IN_FLIGHT_FOR);
        let busy = |m: &PlannedMove| {
            self.in_flight
                .iter()
                .any(|f| f.planned.from == m.from && f.planned.request == m.request)
        };
        // A request whose move is still under way is not handed another.
        self.to_hand = planned.iter().filter(|m| !busy(m)).cloned().collect();
        self.planned = planned;
        &self.planned
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
            self.forget(id);
            self.bump(id, "expired");
        }
        gone
    }

    /// Creditors for `req.home`: live workers other than the home that lend, most lendable
    /// blocks first (ties by id, so advice is stable); see [`placement::rank_lenders`].
    pub fn advise(&self, req: &BorrowRequest, now: Instant) -> Result<BorrowAdvice, LedgerError> {
        let (ids, instances) = self.instances(now);
        let home = ids
            .iter()
            .position(|id| **id == req.home)
            .ok_or_else(|| LedgerError::UnknownWorker(req.home.clone()))?;
        let creditors = placement::rank_lenders(&instances, home)
            .into_iter()
            .map(|i| Creditor {
                worker_id: ids[i].clone(),
                peer_addr: self.members[ids[i]].peer_addr.clone(),
                lendable_blocks: instances[i].lendable_blocks(),
                running_requests: instances[i].batch,
            })
            .collect();
        Ok(BorrowAdvice {
            epoch: self.epoch,
            creditors,
        })
    }

    /// Live workers and their summed figures, the debt ledger, each worker's placement role
    /// and the moves a placement round would make. `block_tokens` is 0 while no worker is live.
    pub fn view(&self, now: Instant) -> PoolView {
        let (ids, instances) = self.instances(now);
        let by_role = |role: Role| -> Vec<String> {
            ids.iter()
                .zip(&instances)
                .filter(|(_, i)| placement::role(i, &self.placement) == role)
                .map(|(id, _)| (*id).clone())
                .collect()
        };
        let debtors = by_role(Role::Debtor);
        let creditors = by_role(Role::Creditor);
        let debts = self
            .debts()
            .into_iter()
            .map(|((home, creditor), blocks)| Debt {
                home,
                creditor,
                blocks,
            })
            .collect();
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
                    migrated_blocks: m.migrated_blocks,
                }
            })
            .collect();
        PoolView {
            epoch: self.epoch,
            block_tokens,
            workers,
            totals,
            debtors,
            creditors,
            debts,
            planned_moves: self.planned.clone(),
            moves_in_flight: self.in_flight.iter().map(|f| f.planned.clone()).collect(),
            epoch_history: self.history.iter().cloned().collect(),
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

    fn ledger() -> Ledger {
        Ledger::new(EXPIRY, PlacementConfig::default())
    }

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
        let mut l = ledger();
        assert_eq!(l.epoch(), 0);
        assert_eq!(l.register(reg("a", pool(8, 0, 0, 4)), t), Ok(1));
        assert_eq!(l.register(reg("b", pool(8, 0, 0, 4)), t), Ok(2));
        assert_eq!(l.leave("a"), Ok(3));
        assert_eq!(l.leave("a"), Err(LedgerError::UnknownWorker("a".into())));
        assert_eq!(l.epoch(), 3, "a refused leave changes nothing");
    }

    #[test]
    fn the_epoch_continues_from_a_previous_gmanagers_never_back() {
        let t = Instant::now();
        let mut l = ledger();
        l.continue_from(12);
        assert_eq!(l.register(reg("a", pool(8, 0, 0, 4)), t), Ok(13));
        l.continue_from(5);
        assert_eq!(l.epoch(), 13, "an older epoch changes nothing");
    }

    #[test]
    fn heartbeats_keep_the_epoch_and_update_figures() {
        let t = Instant::now();
        let mut l = ledger();
        l.register(reg("a", pool(8, 0, 0, 4)), t).unwrap();
        assert_eq!(
            l.heartbeat("a", pool(8, 5, 1, 4), &[], t + Duration::from_millis(10)),
            Ok(1)
        );
        let v = l.view(t + Duration::from_millis(30));
        assert_eq!(v.workers[0].pool, pool(8, 5, 1, 4));
        assert_eq!(v.workers[0].free_blocks, 2);
        assert_eq!(v.workers[0].last_seen_ms, 20);
    }

    #[test]
    fn heartbeat_from_an_unknown_worker_is_refused() {
        let mut l = ledger();
        assert_eq!(
            l.heartbeat("ghost", PoolFigures::default(), &[], Instant::now()),
            Err(LedgerError::UnknownWorker("ghost".into()))
        );
        assert_eq!(l.epoch(), 0);
    }

    #[test]
    fn re_registering_replaces_the_worker_and_bumps_the_epoch() {
        let t = Instant::now();
        let mut l = ledger();
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
        let mut l = ledger();
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
        let mut l = ledger();
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
    fn workers_that_never_lend_are_not_advised_and_full_ones_come_last() {
        // A full lender stays on the advice: asked for an older request, it calls back the
        // loans of newer ones (wound-wait). A worker with no lend cap never lends.
        let t = Instant::now();
        let mut l = ledger();
        l.register(reg("home", pool(8, 8, 0, 4)), t).unwrap();
        l.register(reg("full", pool(8, 8, 0, 4)), t).unwrap();
        l.register(reg("at_cap", pool(8, 0, 4, 4)), t).unwrap();
        l.register(reg("no_cap", pool(8, 0, 0, 0)), t).unwrap();
        l.register(reg("spare", pool(8, 6, 0, 4)), t).unwrap();
        let advice = l.advise(&ask("home"), t).unwrap();
        assert_eq!(ids(&advice), ["spare", "at_cap", "full"]);
        assert_eq!(advice.creditors[2].lendable_blocks, 0);
    }

    #[test]
    fn advice_for_an_unknown_home_is_refused() {
        let t = Instant::now();
        let mut l = ledger();
        l.register(reg("a", pool(8, 0, 0, 4)), t).unwrap();
        assert_eq!(
            l.advise(&ask("ghost"), t),
            Err(LedgerError::UnknownWorker("ghost".into()))
        );
    }

    #[test]
    fn silent_workers_expire_one_epoch_each() {
        let t = Instant::now();
        let mut l = ledger();
        l.register(reg("a", pool(8, 0, 0, 4)), t).unwrap();
        l.register(reg("b", pool(8, 0, 0, 4)), t).unwrap();
        l.register(reg("c", pool(8, 0, 0, 4)), t).unwrap();
        let beat = pool(8, 0, 0, 4);
        l.heartbeat("c", beat, &[], t + Duration::from_millis(200))
            .unwrap();
        assert!(l.expire(t + EXPIRY - Duration::from_millis(1)).is_empty());
        assert_eq!(l.expire(t + EXPIRY), ["a", "b"]);
        assert_eq!(l.epoch(), 5);
        assert_eq!(
            l.heartbeat("a", beat, &[], t + EXPIRY),
            Err(LedgerError::UnknownWorker("a".into())),
            "an expired worker must register again"
        );
        assert_eq!(l.view(t + EXPIRY).workers.len(), 1);
    }

    #[test]
    fn expired_but_unswept_workers_are_neither_advised_nor_shown() {
        let t = Instant::now();
        let mut l = ledger();
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
        let mut l = ledger();
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
        let v = ledger().view(Instant::now());
        assert_eq!(v.epoch, 0);
        assert_eq!(v.block_tokens, 0);
        assert!(v.workers.is_empty());
        assert_eq!(v.totals, PoolFigures::default());
    }

    fn delta(request: u64, holder: &str, blocks: i64) -> PlacementDelta {
        PlacementDelta {
            request,
            holder: holder.into(),
            blocks,
        }
    }

    fn debts(l: &Ledger) -> Vec<(String, String, u64)> {
        l.debts().into_iter().map(|((h, c), b)| (h, c, b)).collect()
    }

    #[test]
    fn placement_deltas_sum_into_debts() {
        let t = Instant::now();
        let mut l = ledger();
        for id in ["a", "b", "c"] {
            l.register(reg(id, pool(100, 0, 0, 50)), t).unwrap();
        }
        let beat = pool(100, 10, 0, 50);
        l.heartbeat("a", beat, &[delta(1, "a", 10), delta(1, "b", 5)], t)
            .unwrap();
        l.heartbeat("a", beat, &[delta(2, "b", 3), delta(2, "c", 4)], t)
            .unwrap();
        l.heartbeat("c", beat, &[delta(7, "a", 2)], t).unwrap();
        assert_eq!(
            debts(&l),
            [
                ("a".into(), "b".into(), 8),
                ("a".into(), "c".into(), 4),
                ("c".into(), "a".into(), 2)
            ]
        );
        // Returning blocks, one request finishing.
        l.heartbeat("a", beat, &[delta(1, "b", -5), delta(1, "a", -10)], t)
            .unwrap();
        assert_eq!(debts(&l)[0], ("a".into(), "b".into(), 3));
        let v = l.view(t);
        assert_eq!(v.debts.len(), 3);
        assert_eq!(v.debts[0].blocks, 3);
    }

    #[test]
    fn a_heartbeat_that_removes_more_than_was_placed_changes_nothing() {
        let t = Instant::now();
        let mut l = ledger();
        l.register(reg("a", pool(100, 0, 0, 50)), t).unwrap();
        l.register(reg("b", pool(100, 0, 0, 50)), t).unwrap();
        l.heartbeat("a", pool(100, 0, 0, 50), &[delta(1, "b", 4)], t)
            .unwrap();
        let bad = [delta(1, "b", 2), delta(1, "b", -7)];
        assert_eq!(
            l.heartbeat("a", pool(100, 9, 0, 50), &bad, t),
            Err(LedgerError::PlacementUnderflow {
                request: 1,
                holder: "b".into()
            })
        );
        assert_eq!(debts(&l), [("a".into(), "b".into(), 4)]);
        assert_eq!(
            l.view(t).workers[0].pool.used_blocks,
            0,
            "figures untouched"
        );
        assert_eq!(
            l.heartbeat("a", pool(100, 0, 0, 50), &[delta(1, "ghost", 1)], t),
            Err(LedgerError::UnknownWorker("ghost".into())),
            "blocks cannot be placed on a worker the ledger does not know"
        );
    }

    #[test]
    fn a_departed_worker_takes_its_requests_and_the_blocks_it_held() {
        let t = Instant::now();
        let mut l = ledger();
        for id in ["a", "b", "c"] {
            l.register(reg(id, pool(100, 0, 0, 50)), t).unwrap();
        }
        let beat = pool(100, 0, 0, 50);
        l.heartbeat("a", beat, &[delta(1, "b", 5), delta(1, "c", 6)], t)
            .unwrap();
        l.heartbeat("b", beat, &[delta(2, "c", 7)], t).unwrap();
        l.leave("b").unwrap();
        assert_eq!(debts(&l), [("a".into(), "c".into(), 6)]);
        // The home recomputes the lost blocks elsewhere and reports both halves.
        l.heartbeat("a", beat, &[delta(1, "b", -5), delta(1, "c", 5)], t)
            .unwrap();
        assert_eq!(debts(&l), [("a".into(), "c".into(), 11)]);
        // Silence works the same way as leaving.
        let later = t + EXPIRY;
        l.heartbeat("a", beat, &[], later).unwrap();
        assert_eq!(l.expire(later), ["c"]);
        assert!(debts(&l).is_empty());
    }

    #[test]
    fn the_view_names_debtors_creditors_and_the_planned_moves() {
        let t = Instant::now();
        let mut l = ledger();
        let mut full = pool(1000, 1000, 0, 500);
        full.running_requests = 2;
        full.waiting_requests = 3;
        l.register(reg("full", full), t).unwrap();
        l.register(reg("idle", pool(1000, 0, 0, 500)), t).unwrap();
        l.register(reg("busy", pool(1000, 950, 0, 500)), t).unwrap();
        l.heartbeat(
            "full",
            full,
            &[delta(1, "full", 800), delta(2, "full", 200)],
            t,
        )
        .unwrap();
        let v = l.view(t);
        assert_eq!(v.debtors, ["full"]);
        assert_eq!(v.creditors, ["idle"]);
        assert!(v.planned_moves.is_empty(), "no round has run yet");
        let moves = l.place(t).to_vec();
        assert_eq!(
            moves,
            [PlannedMove {
                request: 1,
                from: "full".into(),
                to: "idle".into(),
                blocks: 500
            }],
            "the longest request, to the freest creditor, what the next request needs"
        );
        assert_eq!(l.view(t).planned_moves, moves);
    }

    #[test]
    fn planned_moves_are_handed_once_and_stay_in_flight_until_placements_show_them() {
        let t = Instant::now();
        let mut l = ledger();
        let mut full = pool(1000, 1000, 0, 500);
        full.running_requests = 2;
        full.waiting_requests = 3;
        l.register(reg("full", full), t).unwrap();
        l.register(reg("idle", pool(1000, 0, 0, 500)), t).unwrap();
        l.heartbeat("full", full, &[delta(1, "full", 1000)], t)
            .unwrap();
        let planned = l.place(t).to_vec();
        assert_eq!(planned.len(), 1);
        assert!(
            l.take_moves("idle", t).is_empty(),
            "only the home gets them"
        );
        assert_eq!(l.take_moves("full", t), planned);
        assert!(l.take_moves("full", t).is_empty(), "handed once");
        assert_eq!(l.view(t).moves_in_flight, planned);
        l.place(t);
        assert!(
            l.take_moves("full", t).is_empty(),
            "a request with a move under way gets no second one"
        );
        // The home reports the blocks on the creditor: the move is done.
        l.heartbeat(
            "full",
            full,
            &[delta(1, "full", -3), delta(1, "idle", 3)],
            t,
        )
        .unwrap();
        assert!(l.view(t).moves_in_flight.is_empty());
        l.report_migrated("full", 3);
        let v = l.view(t);
        let w = v.workers.iter().find(|w| w.worker_id == "full").unwrap();
        assert_eq!(w.migrated_blocks, 3);
        let changes: Vec<(u64, &str, &str)> = v
            .epoch_history
            .iter()
            .map(|c| (c.epoch, c.worker.as_str(), c.change.as_str()))
            .collect();
        assert_eq!(changes, [(1, "full", "joined"), (2, "idle", "joined")]);
        l.leave("idle").unwrap();
        assert_eq!(l.view(t).epoch_history.last().unwrap().change, "left");
    }
}
