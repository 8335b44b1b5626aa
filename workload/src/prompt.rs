//! Prompts of an exact token length, sent as token ids (OpenAI's `"prompt": [ids]`), so no
//! tokenizer on either side can change the length the trace asks for.

use std::ops::Range;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Ids past the demo model's special tokens and within its vocabulary of 1024; every
/// Llama-family vocabulary has them as ordinary tokens too.
pub const DEFAULT_TOKEN_IDS: Range<u32> = 20..920;

/// `len` ids drawn from `ids`, the same for the same `seed` and `index`, different across
/// requests so that no server can answer one from another's cache.
pub fn token_ids(seed: u64, index: usize, len: usize, ids: Range<u32>) -> Vec<u32> {
    let mut rng = StdRng::seed_from_u64(seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    (0..len).map(|_| rng.random_range(ids.clone())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_length_in_range_and_reproducible() {
        let a = token_ids(1, 0, 300, DEFAULT_TOKEN_IDS);
        assert_eq!(a.len(), 300);
        assert!(a.iter().all(|id| DEFAULT_TOKEN_IDS.contains(id)));
        assert_eq!(a, token_ids(1, 0, 300, DEFAULT_TOKEN_IDS));
        assert_ne!(a, token_ids(1, 1, 300, DEFAULT_TOKEN_IDS));
        assert_ne!(a, token_ids(2, 0, 300, DEFAULT_TOKEN_IDS));
    }
}
