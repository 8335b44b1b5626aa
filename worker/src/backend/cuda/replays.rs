//! Which parts of a step run from a recorded CUDA graph, which get recorded, and which run
//! eagerly. Pure bookkeeping, generic over the recorded thing, so it is tested without a GPU.
//!
//! A decode batch keeps its size for many steps, so a part is recorded the second step in a row
//! with the same number of rows (a batch size seen once is not worth a capture), and replayed
//! while the buffers it was recorded on stay where they were (the fingerprint). Records are
//! kept for a few batch sizes, the least recently used dropped first.

use std::collections::HashMap;

use crate::backend::ReplayKey;

/// Steps with more rows (prompt chunks) are GEMM-bound: launch costs do not matter there.
const MAX_ROWS: usize = 256;
/// Batch sizes whose records are kept at once.
const KEPT_BATCHES: usize = 8;

pub(super) struct Replays<G> {
    on: bool,
    records: HashMap<ReplayKey, G>,
    /// Device addresses the records point at.
    fingerprint: Vec<u64>,
    /// Rows of the step before this one, and of this one (0 before any).
    last_rows: usize,
    rows: usize,
    /// Batch sizes with records, least recently used first.
    batches: Vec<usize>,
}

pub(super) enum Decision<'a, G> {
    Replay(&'a G),
    Record,
    Eager,
}

impl<G> Replays<G> {
    pub(super) fn new(on: bool) -> Self {
        Self {
            on,
            records: HashMap::new(),
            fingerprint: Vec::new(),
            last_rows: 0,
            rows: 0,
            batches: Vec::new(),
        }
    }

    pub(super) fn set_on(&mut self, on: bool) {
        self.on = on;
        self.forget();
    }

    /// A new step of `rows` rows begins, its buffers at `fingerprint`.
    pub(super) fn step(&mut self, rows: usize, fingerprint: Vec<u64>) {
        if self.fingerprint != fingerprint {
            self.forget();
            self.fingerprint = fingerprint;
        }
        self.last_rows = std::mem::replace(&mut self.rows, rows);
        if let Some(i) = self.batches.iter().position(|&b| b == rows) {
            let b = self.batches.remove(i);
            self.batches.push(b);
        }
    }

    /// What to do with part `key` of this step.
    pub(super) fn decide(&self, key: ReplayKey) -> Decision<'_, G> {
        if !self.on || key.rows == 0 || key.rows > MAX_ROWS || key.rows != self.rows {
            return Decision::Eager;
        }
        if let Some(record) = self.records.get(&key) {
            return Decision::Replay(record);
        }
        if self.last_rows == key.rows {
            Decision::Record
        } else {
            Decision::Eager
        }
    }

    /// Keeps what `Record` asked for, dropping the least recently used batch size's records
    /// beyond the most kept.
    pub(super) fn keep(&mut self, key: ReplayKey, record: G) {
        if !self.batches.contains(&key.rows) {
            self.batches.push(key.rows);
            if self.batches.len() > KEPT_BATCHES {
                let old = self.batches.remove(0);
                self.records.retain(|k, _| k.rows != old);
            }
        }
        self.records.insert(key, record);
    }

    pub(super) fn forget(&mut self) {
        self.records.clear();
        self.batches.clear();
    }

    #[cfg(test)]
    fn recorded(&self) -> usize {
        self.records.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(part: usize, rows: usize) -> ReplayKey {
        ReplayKey { part, rows }
    }

    /// Runs one step of `parts` parts the way the backend does; returns how many were
    /// replayed and how many recorded.
    fn run_step(r: &mut Replays<usize>, rows: usize, parts: usize, fp: &[u64]) -> (usize, usize) {
        r.step(rows, fp.to_vec());
        let (mut replayed, mut recorded) = (0, 0);
        for part in 0..parts {
            match r.decide(key(part, rows)) {
                Decision::Replay(&p) => {
                    assert_eq!(p, part, "a record replays for its own part only");
                    replayed += 1;
                }
                Decision::Record => {
                    r.keep(key(part, rows), part);
                    recorded += 1;
                }
                Decision::Eager => {}
            }
        }
        (replayed, recorded)
    }

    #[test]
    fn a_batch_size_is_recorded_on_its_second_step_in_a_row_then_replayed() {
        let mut r = Replays::new(true);
        assert_eq!(run_step(&mut r, 4, 33, &[1]), (0, 0));
        assert_eq!(run_step(&mut r, 4, 33, &[1]), (0, 33));
        assert_eq!(run_step(&mut r, 4, 33, &[1]), (33, 0));
        // A size seen once between runs of another is not recorded.
        assert_eq!(run_step(&mut r, 5, 33, &[1]), (0, 0));
        assert_eq!(run_step(&mut r, 4, 33, &[1]), (33, 0));
    }

    #[test]
    fn moved_buffers_drop_every_record() {
        let mut r = Replays::new(true);
        run_step(&mut r, 2, 3, &[1, 2]);
        run_step(&mut r, 2, 3, &[1, 2]);
        assert_eq!(r.recorded(), 3);
        assert_eq!(run_step(&mut r, 2, 3, &[1, 7]), (0, 3));
        assert_eq!(r.recorded(), 3);
        r.forget();
        assert_eq!(run_step(&mut r, 2, 3, &[1, 7]), (0, 3));
    }

    #[test]
    fn prompt_sized_steps_and_a_switched_off_cache_run_eagerly() {
        let mut r = Replays::new(true);
        for _ in 0..3 {
            assert_eq!(run_step(&mut r, MAX_ROWS + 1, 4, &[1]), (0, 0));
        }
        r.set_on(false);
        for _ in 0..3 {
            assert_eq!(run_step(&mut r, 1, 4, &[1]), (0, 0));
        }
        assert_eq!(r.recorded(), 0);
    }

    #[test]
    fn the_least_recently_used_batch_size_goes_first() {
        let mut r = Replays::new(true);
        for rows in 1..=KEPT_BATCHES {
            run_step(&mut r, rows, 2, &[1]);
            run_step(&mut r, rows, 2, &[1]);
        }
        // Size 1 used again: size 2 is now the oldest.
        run_step(&mut r, 1, 2, &[1]);
        run_step(&mut r, 99, 2, &[1]);
        run_step(&mut r, 99, 2, &[1]);
        assert_eq!(r.recorded(), 2 * KEPT_BATCHES);
        assert_eq!(run_step(&mut r, 1, 2, &[1]), (2, 0));
        assert_eq!(run_step(&mut r, 2, 2, &[1]), (0, 0));
    }

    #[test]
    fn a_part_of_a_step_of_other_rows_is_not_replayed() {
        let mut r = Replays::new(true);
        run_step(&mut r, 3, 2, &[1]);
        run_step(&mut r, 3, 2, &[1]);
        r.step(3, vec![1]);
        // A row count other than the step's (a caller's mistake) runs eagerly rather than
        // replaying the wrong shape.
        assert!(matches!(r.decide(key(0, 4)), Decision::Eager));
        assert!(matches!(r.decide(key(0, 3)), Decision::Replay(_)));
    }
}
