//! Randomized model-based tests of the ledger and placement: a model of workers that own real
//! block slots joins, drains, crashes, borrows and returns blocks following the ledger's advice
//! and placement rounds, and heartbeats what it holds. After every step no slot has two owners,
//! no slot is held for a request that no longer exists, and the ledger equals what the workers
//! reported; once everyone has reported, it equals the truth. The gManager itself may restart:
//! a fresh ledger rebuilt from the workers' re-registrations and re-reports must equal the old.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use infinite_llm_protocol::gmanager::{BorrowRequest, PlacementDelta, PoolFigures, Register};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::ledger::Ledger;
use super::placement::PlacementConfig;

const EXPIRY: Duration = Duration::from_secs(10);
const TICK: Duration = Duration::from_millis(1);

/// Which request of which home a slot holds.
type Owner = (String, u64);
/// Blocks of (home, request) by holder.
type Placement = BTreeMap<(String, u64), BTreeMap<String, u64>>;

struct Worker {
    lend_cap: u64,
    slots: Vec<Option<Owner>>,
    /// Placement changes of this worker's requests since its last heartbeat.
    pending: Vec<PlacementDelta>,
    waiting: u64,
    /// What the last heartbeat (or registration) reported.
    reported: PoolFigures,
    /// Its requests' placement as of that report.
    reported_placement: Placement,
}

struct Model {
    rng: StdRng,
    now: Instant,
    ledger: Ledger,
    workers: BTreeMap<String, Worker>,
    next_worker: u64,
    next_request: u64,
    /// Moves placement rounds asked for and the model carried out.
    moved_blocks: u64,
    /// Blocks copied off draining workers, and recomputed elsewhere after crashes.
    evacuated_blocks: u64,
    recovered_blocks: u64,
    /// gManager restarts the ledger was rebuilt from.
    restarts: u64,
}

impl Model {
    fn new(seed: u64) -> Self {
        Model {
            rng: StdRng::seed_from_u64(seed),
            now: Instant::now(),
            ledger: Ledger::new(EXPIRY, PlacementConfig::default()),
            workers: BTreeMap::new(),
            next_worker: 0,
            next_request: 0,
            moved_blocks: 0,
            evacuated_blocks: 0,
            recovered_blocks: 0,
            restarts: 0,
        }
    }

    fn figures(&self, id: &str) -> PoolFigures {
        let w = &self.workers[id];
        let mut f = PoolFigures {
            total_blocks: w.slots.len() as u64,
            lend_cap_blocks: w.lend_cap,
            waiting_requests: w.waiting,
            ..Default::default()
        };
        for owner in w.slots.iter().flatten() {
            if owner.0 == id {
                f.used_blocks += 1;
            } else {
                f.lent_blocks += 1;
            }
        }
        let mut requests = BTreeSet::new();
        for (holder, other) in &self.workers {
            for owner in other.slots.iter().flatten() {
                if owner.0 == id {
                    requests.insert(owner.1);
                    if holder != id {
                        f.borrowed_blocks += 1;
                    }
                }
            }
        }
        f.running_requests = requests.len() as u64;
        f
    }

    /// Where every live request keeps its blocks, from the slots.
    fn truth(&self) -> Placement {
        let mut p = Placement::new();
        for (holder, w) in &self.workers {
            for (home, request) in w.slots.iter().flatten() {
                *p.entry((home.clone(), *request))
                    .or_default()
                    .entry(holder.clone())
                    .or_insert(0) += 1;
            }
        }
        p
    }

    fn placement_of(&self, home: &str) -> Placement {
        self.truth()
            .into_iter()
            .filter(|((h, _), _)| h == home)
            .collect()
    }

    fn free_slots(&self, id: &str) -> usize {
        self.workers[id]
            .slots
            .iter()
            .filter(|s| s.is_none())
            .count()
    }

    /// What `id` would lend now by its own rManager's rules: free and under its cap.
    fn lendable(&self, id: &str) -> u64 {
        let lent = self.figures(id).lent_blocks;
        (self.free_slots(id) as u64).min(self.workers[id].lend_cap.saturating_sub(lent))
    }

    fn tick(&mut self) {
        self.now += TICK;
    }

    fn record(&mut self, home: &str, request: u64, holder: &str, blocks: i64) {
        self.workers
            .get_mut(home)
            .expect("live home")
            .pending
            .push(PlacementDelta {
                request,
                holder: holder.to_owned(),
                blocks,
            });
    }

    /// Takes up to `n` free slots on `holder` for the request.
    fn take(&mut self, holder: &str, owner: &Owner, n: u64) -> u64 {
        let mut taken = 0;
        for slot in self.workers.get_mut(holder).unwrap().slots.iter_mut() {
            if taken == n {
                break;
            }
            if slot.is_none() {
                *slot = Some(owner.clone());
                taken += 1;
            }
        }
        taken
    }

    /// Frees every slot of the request, wherever it is.
    fn release(&mut self, owner: &Owner) -> BTreeMap<String, u64> {
        let mut freed = BTreeMap::new();
        for (holder, w) in self.workers.iter_mut() {
            for slot in w.slots.iter_mut() {
                if slot.as_ref() == Some(owner) {
                    *slot = None;
                    *freed.entry(holder.clone()).or_insert(0) += 1;
                }
            }
        }
        freed
    }

    fn pick_worker(&mut self) -> Option<String> {
        if self.workers.is_empty() {
            return None;
        }
        let i = self.rng.random_range(0..self.workers.len());
        self.workers.keys().nth(i).cloned()
    }

    fn join(&mut self) {
        let id = format!("w{}", self.next_worker);
        self.next_worker += 1;
        let total = self.rng.random_range(4..48u64);
        let w = Worker {
            lend_cap: total / 2,
            slots: vec![None; total as usize],
            pending: Vec::new(),
            waiting: 0,
            reported: PoolFigures::default(),
            reported_placement: Placement::new(),
        };
        self.workers.insert(id.clone(), w);
        let pool = self.figures(&id);
        let reg = Register {
            worker_id: id.clone(),
            api_url: String::new(),
            peer_addr: format!("{id}:9000"),
            block_tokens: 16,
            pool,
        };
        self.ledger.register(reg, self.now).unwrap();
        self.workers.get_mut(&id).unwrap().reported = pool;
    }

    fn heartbeat(&mut self, id: &str) {
        let pool = self.figures(id);
        let pending = std::mem::take(&mut self.workers.get_mut(id).unwrap().pending);
        self.ledger
            .heartbeat(id, pool, &pending, self.now)
            .unwrap_or_else(|e| panic!("heartbeat of {id} with {pending:?}: {e}"));
        let placement = self.placement_of(id);
        let w = self.workers.get_mut(id).unwrap();
        w.reported = pool;
        w.reported_placement = placement;
    }

    /// A new request at `home`: local slots first, then creditors in the order the ledger
    /// advises, each reserving only what it really has (two-phase: all or nothing).
    fn borrow(&mut self, home: &str) {
        let need = self.rng.random_range(1..=48u64);
        let request = self.next_request;
        self.next_request += 1;
        let owner = (home.to_owned(), request);
        let mut got = vec![(home.to_owned(), self.take(home, &owner, need))];
        let mut left = need - got[0].1;
        if left > 0 {
            let ask = BorrowRequest {
                home: home.to_owned(),
                blocks: left,
            };
            let advice = self.ledger.advise(&ask, self.now).unwrap();
            for c in advice.creditors {
                assert_ne!(c.worker_id, home, "a home is never its own creditor");
                assert!(
                    self.workers.contains_key(&c.worker_id),
                    "advised {} is not live",
                    c.worker_id
                );
                let n = self.lendable(&c.worker_id).min(left);
                let n = self.take(&c.worker_id, &owner, n);
                left -= n;
                got.push((c.worker_id, n));
                if left == 0 {
                    break;
                }
            }
        }
        if left > 0 {
            self.release(&owner);
            self.workers.get_mut(home).unwrap().waiting += 1;
            return;
        }
        for (holder, n) in got {
            if n > 0 {
                self.record(home, request, &holder, n as i64);
            }
        }
    }

    fn finish(&mut self) {
        let requests: Vec<Owner> = self.truth().into_keys().collect();
        if requests.is_empty() {
            return;
        }
        let owner = requests[self.rng.random_range(0..requests.len())].clone();
        for (holder, n) in self.release(&owner) {
            self.record(&owner.0, owner.1, &holder, -(n as i64));
        }
    }

    /// Moves one slot of (home, request) from `from` to some other live worker that can lend,
    /// in advice order; the request fails when none can. Returns whether it moved.
    fn relocate(&mut self, owner: &Owner, from: &str) -> bool {
        let advice = self
            .ledger
            .advise(
                &BorrowRequest {
                    home: owner.0.clone(),
                    blocks: 1,
                },
                self.now,
            )
            .unwrap();
        let mut targets: Vec<String> = advice
            .creditors
            .into_iter()
            .map(|c| c.worker_id)
            .filter(|c| c != from && self.workers.contains_key(c))
            .collect();
        // The home itself takes its block back first when it has room.
        if owner.0 != from {
            targets.insert(0, owner.0.clone());
        }
        for t in targets {
            let room = if t == owner.0 {
                self.free_slots(&t) as u64
            } else {
                self.lendable(&t)
            };
            if room > 0 && self.take(&t, owner, 1) == 1 {
                self.record(&owner.0, owner.1, &t, 1);
                return true;
            }
        }
        false
    }

    /// Graceful leave: the worker's own requests finish, the blocks it lends are copied
    /// elsewhere, it reports, and only then leaves.
    fn drain(&mut self, id: &str) {
        let own: Vec<Owner> = self
            .truth()
            .into_keys()
            .filter(|(home, _)| home == id)
            .collect();
        for owner in own {
            for (holder, n) in self.release(&owner) {
                self.record(id, owner.1, &holder, -(n as i64));
            }
        }
        self.evacuate(id);
        self.heartbeat(id);
        self.ledger.leave(id).unwrap();
        self.workers.remove(id);
        self.forget_dead_homes();
    }

    /// Places every block `id` holds for other homes somewhere else; homes that cannot place
    /// one fail the request and free its blocks.
    fn evacuate(&mut self, id: &str) {
        let held: Vec<Owner> = self.workers[id].slots.iter().flatten().cloned().collect();
        for owner in held {
            let Some(slot) = self.workers[id]
                .slots
                .iter()
                .position(|s| s.as_ref() == Some(&owner))
            else {
                continue;
            };
            if self.relocate(&owner, id) {
                self.workers.get_mut(id).unwrap().slots[slot] = None;
                self.record(&owner.0, owner.1, id, -1);
                self.evacuated_blocks += 1;
            } else {
                for (holder, n) in self.release(&owner) {
                    self.record(&owner.0, owner.1, &holder, -(n as i64));
                }
            }
        }
    }

    /// A crash: the worker vanishes with its slots and stops heartbeating. The others beat on
    /// until the ledger expires it, then homes recompute what they lost elsewhere and holders
    /// free what they held for the dead home.
    fn crash(&mut self, id: &str) {
        let lost: Vec<Owner> = self.workers[id].slots.iter().flatten().cloned().collect();
        self.workers.remove(id);
        self.now += EXPIRY;
        let live: Vec<String> = self.workers.keys().cloned().collect();
        for w in &live {
            self.heartbeat(w);
        }
        assert_eq!(self.ledger.expire(self.now), [id.to_owned()]);
        self.forget_dead_homes();
        for owner in lost {
            if !self.workers.contains_key(&owner.0) || !self.truth().contains_key(&owner) {
                continue;
            }
            self.record(&owner.0, owner.1, id, -1);
            if self.relocate(&owner, id) {
                self.recovered_blocks += 1;
            } else {
                for (holder, n) in self.release(&owner) {
                    self.record(&owner.0, owner.1, &holder, -(n as i64));
                }
            }
        }
    }

    /// Holders free blocks of homes the ledger no longer lists: how a crashed home's borrowed
    /// blocks come back.
    fn forget_dead_homes(&mut self) {
        let live: BTreeSet<String> = self
            .ledger
            .view(self.now)
            .workers
            .into_iter()
            .map(|w| w.worker_id)
            .collect();
        for w in self.workers.values_mut() {
            for slot in w.slots.iter_mut() {
                if slot.as_ref().is_some_and(|(home, _)| !live.contains(home)) {
                    *slot = None;
                }
            }
        }
    }

    /// The gManager restarts with an empty ledger: every worker's heartbeat gets 404, so each
    /// registers again with its figures, then reports its requests' whole placement (a fresh
    /// ledger holds nothing, so everything is a change). Registrations come first: a placement
    /// may name any live worker as holder.
    fn restart(&mut self) {
        self.ledger = Ledger::new(EXPIRY, PlacementConfig::default());
        self.restarts += 1;
        let ids: Vec<String> = self.workers.keys().cloned().collect();
        for id in &ids {
            let pool = self.figures(id);
            self.ledger
                .register(
                    Register {
                        worker_id: id.clone(),
                        api_url: String::new(),
                        peer_addr: format!("{id}:9000"),
                        block_tokens: 16,
                        pool,
                    },
                    self.now,
                )
                .unwrap();
            self.workers.get_mut(id).unwrap().reported = pool;
        }
        for id in &ids {
            let all: Vec<PlacementDelta> = self
                .placement_of(id)
                .into_iter()
                .flat_map(|((_, request), holders)| {
                    holders.into_iter().map(move |(holder, n)| PlacementDelta {
                        request,
                        holder,
                        blocks: n as i64,
                    })
                })
                .collect();
            self.workers.get_mut(id).unwrap().pending = all;
            self.heartbeat(id);
        }
    }

    /// Runs a placement round and carries out its moves where the creditor really has room.
    fn rebalance(&mut self) {
        for w in self.workers.values_mut() {
            w.waiting = w.waiting.min(3);
        }
        let planned = self.ledger.place(self.now).to_vec();
        let cfg = PlacementConfig::default();
        let mut promised: BTreeMap<String, u64> = BTreeMap::new();
        for m in planned {
            assert_ne!(m.from, m.to);
            assert!(self.workers.contains_key(&m.from) && self.workers.contains_key(&m.to));
            let to = &self.workers[&m.to].reported;
            let mark = (to.total_blocks as f64 * cfg.high_watermark).floor() as u64;
            let spare = to
                .lendable_blocks()
                .min(mark.saturating_sub(to.used_blocks + to.lent_blocks));
            let p = promised.entry(m.to.clone()).or_insert(0);
            *p += m.blocks;
            assert!(*p <= spare, "moves exceed {}'s reported spare blocks", m.to);

            let owner = (m.from.clone(), m.request);
            let local: Vec<usize> = self.workers[&m.from]
                .slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.as_ref() == Some(&owner))
                .map(|(i, _)| i)
                .collect();
            let n = (local.len() as u64).min(m.blocks).min(self.lendable(&m.to));
            let n = self.take(&m.to, &owner, n);
            for &slot in local.iter().take(n as usize) {
                self.workers.get_mut(&m.from).unwrap().slots[slot] = None;
            }
            if n > 0 {
                self.record(&m.from, m.request, &m.from, -(n as i64));
                self.record(&m.from, m.request, &m.to, n as i64);
                self.moved_blocks += n;
            }
        }
    }

    fn step(&mut self) {
        self.tick();
        let roll = self.rng.random_range(0..100);
        match roll {
            0..6 => self.join(),
            6..9 => {
                if let Some(id) = self.pick_worker() {
                    self.drain(&id);
                }
            }
            9..12 => {
                if let Some(id) = self.pick_worker() {
                    self.crash(&id);
                }
            }
            12..40 => {
                if let Some(id) = self.pick_worker() {
                    self.heartbeat(&id);
                }
            }
            40..70 => {
                if let Some(id) = self.pick_worker() {
                    self.borrow(&id);
                }
            }
            70..88 => self.finish(),
            88..90 => self.restart(),
            _ => self.rebalance(),
        }
    }

    /// What every worker last reported, and the placement those reports add up to.
    fn reported(&self) -> (BTreeMap<String, PoolFigures>, Placement) {
        let mut placement = Placement::new();
        for w in self.workers.values() {
            for (key, holders) in &w.reported_placement {
                let live: BTreeMap<String, u64> = holders
                    .iter()
                    .filter(|(h, _)| self.workers.contains_key(*h))
                    .map(|(h, n)| (h.clone(), *n))
                    .collect();
                if !live.is_empty() {
                    placement.insert(key.clone(), live);
                }
            }
        }
        let figures = self
            .workers
            .iter()
            .map(|(id, w)| (id.clone(), w.reported))
            .collect();
        (figures, placement)
    }

    fn check(&self, step: usize) {
        // No slot owned twice and none leaked: every held slot belongs to a live request of
        // a live home, and the requests' slots add up to every held slot.
        let held: u64 = self
            .workers
            .values()
            .map(|w| w.slots.iter().flatten().count() as u64)
            .sum();
        let truth = self.truth();
        let placed: u64 = truth.values().flat_map(|h| h.values()).sum();
        assert_eq!(held, placed, "step {step}");
        for (home, _) in truth.keys() {
            assert!(
                self.workers.contains_key(home),
                "step {step}: leaked for {home}"
            );
        }
        for (id, w) in &self.workers {
            let f = self.figures(id);
            assert!(
                f.lent_blocks <= w.lend_cap,
                "step {step}: {id} lent past its cap"
            );
            assert_eq!(
                f.used_blocks + f.lent_blocks + f.free_blocks(),
                f.total_blocks
            );
        }

        // The ledger equals what the workers reported.
        let view = self.ledger.view(self.now);
        let (figures, placement) = self.reported();
        let shown: BTreeMap<String, PoolFigures> = view
            .workers
            .iter()
            .map(|w| (w.worker_id.clone(), w.pool))
            .collect();
        assert_eq!(shown, figures, "step {step}");
        let mut sum = PoolFigures::default();
        for f in figures.values() {
            sum.total_blocks += f.total_blocks;
            sum.used_blocks += f.used_blocks;
            sum.lent_blocks += f.lent_blocks;
            sum.borrowed_blocks += f.borrowed_blocks;
            sum.lend_cap_blocks += f.lend_cap_blocks;
            sum.running_requests += f.running_requests;
            sum.waiting_requests += f.waiting_requests;
        }
        assert_eq!(view.totals, sum, "step {step}");
        assert_eq!(
            self.ledger.placements(),
            &placement,
            "step {step}: the ledger's placements differ from the reported ones"
        );
        for d in &view.debtors {
            assert!(!view.creditors.contains(d), "step {step}: {d} is both");
        }
    }

    /// Everyone reports; then the ledger must equal the truth itself.
    fn sync_and_check(&mut self, step: usize) {
        let live: Vec<String> = self.workers.keys().cloned().collect();
        for id in &live {
            self.heartbeat(id);
        }
        self.check(step);
        assert_eq!(
            self.ledger.placements(),
            &self.truth(),
            "step {step}: after a full report the placements are the truth"
        );
        let debts = self.ledger.debts();
        for id in &live {
            let f = self.figures(id);
            let lent: u64 = debts
                .iter()
                .filter(|((_, holder), _)| holder == id)
                .map(|(_, n)| n)
                .sum();
            let borrowed: u64 = debts
                .iter()
                .filter(|((home, _), _)| home == id)
                .map(|(_, n)| n)
                .sum();
            assert_eq!((lent, borrowed), (f.lent_blocks, f.borrowed_blocks), "{id}");
        }
    }
}

#[test]
fn random_membership_and_borrowing_keep_the_ledger_exact() {
    let (mut moved, mut evacuated, mut recovered, mut restarts) = (0, 0, 0, 0);
    let mut debts_settled = 0;
    for seed in 0..200 {
        let mut m = Model::new(seed);
        for _ in 0..3 {
            m.join();
        }
        for step in 0..300 {
            let before = m.ledger.debts().len();
            m.step();
            if m.workers.is_empty() {
                m.join();
            }
            m.check(step);
            if before > 0 && m.ledger.debts().len() < before {
                debts_settled += 1;
            }
            if step % 50 == 49 {
                m.sync_and_check(step);
            }
        }
        // Every request finishes: nothing stays held or owed.
        let requests: Vec<Owner> = m.truth().into_keys().collect();
        for owner in requests {
            for (holder, n) in m.release(&owner) {
                m.record(&owner.0, owner.1, &holder, -(n as i64));
            }
        }
        m.sync_and_check(usize::MAX);
        assert!(m.ledger.debts().is_empty(), "seed {seed}: debts left");
        assert_eq!(m.ledger.view(m.now).totals.used_blocks, 0);
        moved += m.moved_blocks;
        evacuated += m.evacuated_blocks;
        recovered += m.recovered_blocks;
        restarts += m.restarts;
    }
    // The sequences must exercise what they claim to.
    assert!(moved > 0, "no placement round ever moved a block");
    assert!(debts_settled > 0, "debts never went away");
    assert!(evacuated > 0, "no drain ever copied a lent block away");
    assert!(recovered > 0, "no crash ever lost a lent block");
    assert!(restarts > 0, "the gManager never restarted");
}
