//! The rManager: this worker's rBlock pool seen as a lender. Local requests allocate from it;
//! other workers' requests borrow from it up to the lend cap, so lending never starves local
//! work. It only ever lends what it owns: a remote reservation is never forwarded to a third
//! worker (no borrowing on behalf of a borrower).

use std::collections::{HashMap, HashSet};

use crate::rblock_pool::RBlockPool;

/// Who a lent block is held for: the borrowing worker and its request.
pub type LoanKey = (String, u64);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LendError {
    #[error("lend cap reached: {lent} of {cap} blocks already lent, {asked} more asked")]
    CapReached {
        lent: usize,
        cap: usize,
        asked: usize,
    },
    #[error("only {free} blocks free, {asked} asked")]
    Full { free: usize, asked: usize },
    #[error("block {block} is not lent to {home} for request {request}")]
    NotLent {
        block: u32,
        home: String,
        request: u64,
    },
}

#[derive(Debug)]
pub struct RManager {
    pool: RBlockPool,
    lend_cap: usize,
    lent: HashMap<LoanKey, Vec<u32>>,
    lent_count: usize,
    /// Loans whose homes were asked to give them back ([`RManager::recall_newer`]).
    recalled: HashSet<LoanKey>,
}

impl RManager {
    /// `lend_fraction` of the pool may be lent at once.
    pub fn new(total_blocks: usize, lend_fraction: f64) -> Self {
        Self {
            pool: RBlockPool::new(total_blocks),
            lend_cap: (total_blocks as f64 * lend_fraction.clamp(0.0, 1.0)).floor() as usize,
            lent: HashMap::new(),
            lent_count: 0,
            recalled: HashSet::new(),
        }
    }

    pub fn total(&self) -> usize {
        self.pool.total()
    }

    pub fn free(&self) -> usize {
        self.pool.free_count()
    }

    pub fn lend_cap(&self) -> usize {
        self.lend_cap
    }

    pub fn lent(&self) -> usize {
        self.lent_count
    }

    /// Blocks held by this worker's own requests.
    pub fn used_locally(&self) -> usize {
        self.pool.used_count() - self.lent_count
    }

    /// Blocks for a local request: up to `n`, as many as are free.
    pub fn alloc_local(&mut self, n: usize) -> Vec<u32> {
        let n = n.min(self.pool.free_count());
        self.pool.alloc(n).expect("bounded by the free count")
    }

    pub fn release_local(&mut self, blocks: &[u32]) {
        self.pool.release(blocks);
    }

    /// Reserves `n` blocks for another worker's request, all or nothing.
    pub fn lend(&mut self, key: LoanKey, n: usize) -> Result<Vec<u32>, LendError> {
        if self.lent_count + n > self.lend_cap {
            return Err(LendError::CapReached {
                lent: self.lent_count,
                cap: self.lend_cap,
                asked: n,
            });
        }
        let blocks = self.pool.alloc(n).ok_or(LendError::Full {
            free: self.pool.free_count(),
            asked: n,
        })?;
        self.lent_count += n;
        self.lent.entry(key).or_default().extend(&blocks);
        Ok(blocks)
    }

    /// Blocks another worker could borrow right now: free ones, within the lend cap.
    pub fn lendable(&self) -> usize {
        self.pool
            .free_count()
            .min(self.lend_cap.saturating_sub(self.lent_count))
    }

    /// Reserves as many of `n` blocks as can be lent, refusing only when none can: the home
    /// decides whether what it gathered over its creditors is enough.
    pub fn lend_up_to(&mut self, key: LoanKey, n: usize) -> Result<Vec<u32>, LendError> {
        match self.lendable().min(n) {
            0 => self.lend(key, n.max(1)),
            k => self.lend(key, k),
        }
    }

    /// Checks that every block is lent to `key`: a creditor touches only what it lent.
    pub fn check_lent(
        &self,
        key: &LoanKey,
        blocks: impl IntoIterator<Item = u32>,
    ) -> Result<(), LendError> {
        // A set, not a scan of the list: a long request's call names every block it borrowed
        // here, once per layer, so a scan would cost the square of its blocks each time.
        let held: HashSet<u32> = self
            .lent
            .get(key)
            .map(|v| v.iter().copied().collect())
            .unwrap_or_default();
        for b in blocks {
            if !held.contains(&b) {
                return Err(LendError::NotLent {
                    block: b,
                    home: key.0.clone(),
                    request: key.1,
                });
            }
        }
        Ok(())
    }

    /// Takes back everything lent for one request.
    pub fn take_back(&mut self, key: &LoanKey) -> usize {
        self.recalled.remove(key);
        let blocks = self.lent.remove(key).unwrap_or_default();
        self.pool.release(&blocks);
        self.lent_count -= blocks.len();
        blocks.len()
    }

    /// Takes back some of the blocks lent for one request (their content moved elsewhere).
    /// Refused, freeing nothing, unless every block is lent to `key`.
    pub fn take_back_blocks(&mut self, key: &LoanKey, blocks: &[u32]) -> Result<(), LendError> {
        self.check_lent(key, blocks.iter().copied())?;
        let held = self.lent.get_mut(key).expect("checked above");
        held.retain(|b| !blocks.contains(b));
        if held.is_empty() {
            self.lent.remove(key);
        }
        self.pool.release(blocks);
        self.lent_count -= blocks.len();
        Ok(())
    }

    /// Lends nothing more from now on (the worker drains); loans made stay until returned.
    pub fn stop_lending(&mut self) {
        self.lend_cap = 0;
    }

    /// The homes that hold loans here, each once.
    pub fn borrowers(&self) -> Vec<String> {
        let mut homes: Vec<String> = self.lent.keys().map(|k| k.0.clone()).collect();
        homes.sort_unstable();
        homes.dedup();
        homes
    }

    /// The loans to call back so that request `asker` (of another home, or of this one) may
    /// have `short` more blocks here: those held for requests newer than it, newest first, until they cover
    /// `short`; each is called back once. Ids are arrival times across the pool, so the
    /// oldest request is never called back and always progresses.
    pub fn recall_newer(&mut self, asker: u64, short: usize) -> Vec<LoanKey> {
        let mut newer: Vec<(&LoanKey, usize)> = self
            .lent
            .iter()
            .filter(|(k, _)| k.1 > asker && !self.recalled.contains(*k))
            .map(|(k, b)| (k, b.len()))
            .collect();
        newer.sort_unstable_by(|a, b| b.0.1.cmp(&a.0.1).then_with(|| a.0.0.cmp(&b.0.0)));
        let mut covered = 0;
        let mut out = Vec::new();
        for (key, blocks) in newer {
            if covered >= short {
                break;
            }
            covered += blocks;
            out.push(key.clone());
        }
        self.recalled.extend(out.iter().cloned());
        out
    }

    /// Takes back everything lent to one worker (it left or died).
    pub fn take_back_all(&mut self, home: &str) -> usize {
        let keys: Vec<LoanKey> = self.lent.keys().filter(|k| k.0 == home).cloned().collect();
        keys.iter().map(|k| self.take_back(k)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(h: &str, r: u64) -> LoanKey {
        (h.to_string(), r)
    }

    #[test]
    fn loans_to_newer_requests_are_called_back_newest_first_and_once() {
        let mut rm = RManager::new(16, 0.5);
        rm.lend_up_to(key("a", 10), 3).unwrap();
        rm.lend_up_to(key("b", 30), 2).unwrap();
        rm.lend_up_to(key("c", 20), 3).unwrap();
        // At the cap: request 15 of another home asks for 4.
        assert_eq!(rm.recall_newer(15, 4), [key("b", 30), key("c", 20)]);
        assert!(
            rm.recall_newer(15, 4).is_empty(),
            "each loan is called back once"
        );
        assert!(rm.recall_newer(5, 1).contains(&key("a", 10)));
        assert!(
            rm.recall_newer(40, 8).is_empty(),
            "an older loan is never called back"
        );
        // Given back and lent again, a loan may be called back again.
        rm.take_back(&key("b", 30));
        rm.lend_up_to(key("b", 30), 1).unwrap();
        assert_eq!(rm.recall_newer(15, 1), [key("b", 30)]);
    }

    #[test]
    fn lending_stops_at_the_cap_and_local_work_keeps_the_rest() {
        let mut m = RManager::new(10, 0.5);
        assert_eq!(m.lend_cap(), 5);
        let a = m.lend(key("w1", 1), 3).unwrap();
        assert_eq!(a.len(), 3);
        assert_eq!(
            m.lend(key("w2", 7), 3),
            Err(LendError::CapReached {
                lent: 3,
                cap: 5,
                asked: 3
            })
        );
        m.lend(key("w2", 7), 2).unwrap();
        assert_eq!(
            m.alloc_local(100).len(),
            5,
            "what is not lendable stays for local requests"
        );
        assert_eq!(m.used_locally(), 5);
        assert_eq!(m.lent(), 5);
    }

    #[test]
    fn a_full_pool_refuses_all_or_nothing() {
        let mut m = RManager::new(4, 1.0);
        m.alloc_local(3);
        assert_eq!(
            m.lend(key("w1", 1), 2),
            Err(LendError::Full { free: 1, asked: 2 })
        );
        assert_eq!(m.lent(), 0);
        assert_eq!(m.free(), 1);
    }

    #[test]
    fn lending_up_to_gives_what_is_lendable_and_refuses_only_when_nothing_is() {
        let mut m = RManager::new(8, 0.5);
        assert_eq!(m.lend_up_to(key("w1", 1), 3).unwrap().len(), 3);
        assert_eq!(
            m.lend_up_to(key("w2", 1), 3).unwrap().len(),
            1,
            "the cap leaves one"
        );
        assert_eq!(
            m.lend_up_to(key("w2", 2), 3),
            Err(LendError::CapReached {
                lent: 4,
                cap: 4,
                asked: 3
            })
        );
        let mut full = RManager::new(4, 1.0);
        full.alloc_local(4);
        assert_eq!(
            full.lend_up_to(key("w1", 1), 2),
            Err(LendError::Full { free: 0, asked: 2 })
        );
        assert_eq!((full.lent(), m.lent()), (0, 4));
    }

    #[test]
    fn only_the_borrower_may_touch_its_blocks_and_take_back_frees_them() {
        let mut m = RManager::new(8, 1.0);
        let a = m.lend(key("w1", 1), 2).unwrap();
        let b = m.lend(key("w2", 1), 2).unwrap();
        assert!(m.check_lent(&key("w1", 1), a.clone()).is_ok());
        assert!(m.check_lent(&key("w1", 1), b.clone()).is_err());
        m.lend(key("w1", 2), 1).unwrap();
        assert_eq!(m.borrowers(), ["w1", "w2"]);
        assert_eq!(m.take_back_all("w1"), 3);
        assert_eq!(m.take_back(&key("w2", 1)), 2);
        assert_eq!((m.lent(), m.free()), (0, 8));
    }

    #[test]
    fn blocks_moved_away_come_back_one_by_one_and_only_to_their_borrower() {
        let mut m = RManager::new(8, 1.0);
        let a = m.lend(key("w1", 1), 3).unwrap();
        assert!(m.take_back_blocks(&key("w2", 1), &a[..1]).is_err());
        assert_eq!(m.lent(), 3, "a wrong borrower frees nothing");
        m.take_back_blocks(&key("w1", 1), &a[..2]).unwrap();
        assert_eq!((m.lent(), m.free()), (1, 7));
        assert!(m.check_lent(&key("w1", 1), a[2..].to_vec()).is_ok());
        assert!(
            m.take_back_blocks(&key("w1", 1), &a[..1]).is_err(),
            "already back"
        );
        m.take_back_blocks(&key("w1", 1), &a[2..]).unwrap();
        assert!(m.borrowers().is_empty());
        assert_eq!(m.free(), 8);
    }

    #[test]
    fn a_draining_pool_lends_nothing_more_but_keeps_its_loans() {
        let mut m = RManager::new(8, 0.5);
        m.lend(key("w1", 1), 2).unwrap();
        m.stop_lending();
        assert_eq!(m.lendable(), 0);
        assert!(matches!(
            m.lend_up_to(key("w2", 1), 1),
            Err(LendError::CapReached { .. })
        ));
        assert!(
            m.check_lent(&key("w1", 1), m.lent[&key("w1", 1)].clone())
                .is_ok()
        );
        assert_eq!(m.take_back(&key("w1", 1)), 2);
    }
}
