//! Exact merge of partial attention results (output and log-sum-exp) over disjoint KV sets.
//!
//! With `lse = logaddexp(lse_a, lse_b)`, `o = o_a e^(lse_a - lse) + o_b e^(lse_b - lse)`. The merge
//! is associative and commutative, so any split of a request's blocks gives the same attention.

/// Folds the partial result `(o, lse)` of one head into the accumulator `(acc_o, acc_lse)`.
/// An empty partial has `lse = -inf` and leaves the accumulator as it is.
pub fn merge_into(acc_o: &mut [f32], acc_lse: &mut f32, o: &[f32], lse: f32) {
    debug_assert_eq!(acc_o.len(), o.len());
    if lse == f32::NEG_INFINITY {
        return;
    }
    if *acc_lse == f32::NEG_INFINITY {
        acc_o.copy_from_slice(o);
        *acc_lse = lse;
        return;
    }
    let m = acc_lse.max(lse);
    let wa = (*acc_lse - m).exp();
    let wb = (lse - m).exp();
    let total = wa + wb;
    let (wa, wb) = (wa / total, wb / total);
    for (a, b) in acc_o.iter_mut().zip(o) {
        *a = *a * wa + b * wb;
    }
    *acc_lse = m + total.ln();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference attention of one head over scores `s` and values `v` (rows of `d`), in f64.
    fn attend(s: &[f64], v: &[Vec<f64>]) -> (Vec<f64>, f64) {
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let l: f64 = s.iter().map(|x| (x - m).exp()).sum();
        let d = v[0].len();
        let mut o = vec![0.0; d];
        for (si, vi) in s.iter().zip(v) {
            let p = (si - m).exp() / l;
            for j in 0..d {
                o[j] += p * vi[j];
            }
        }
        (o, m + l.ln())
    }

    fn to32(x: &[f64]) -> Vec<f32> {
        x.iter().map(|&v| v as f32).collect()
    }

    #[test]
    fn any_split_equals_the_whole() {
        let n = 37;
        let d = 8;
        let s: Vec<f64> = (0..n)
            .map(|i| ((i * 7919) % 23) as f64 * 0.37 - 4.0)
            .collect();
        let v: Vec<Vec<f64>> = (0..n)
            .map(|i| {
                (0..d)
                    .map(|j| ((i * 31 + j * 17) % 13) as f64 - 6.0)
                    .collect()
            })
            .collect();
        let (whole_o, whole_lse) = attend(&s, &v);
        for cuts in [
            vec![0, n],
            vec![0, 1, n],
            vec![0, 10, 20, n],
            vec![0, 5, 6, 30, n],
        ] {
            let parts: Vec<(Vec<f32>, f32)> = cuts
                .windows(2)
                .map(|w| {
                    let (o, lse) = attend(&s[w[0]..w[1]], &v[w[0]..w[1]]);
                    (to32(&o), lse as f32)
                })
                .collect();
            // Merge in reverse order too: the result must not depend on it.
            for order in [false, true] {
                let mut acc = vec![0.0f32; d];
                let mut acc_lse = f32::NEG_INFINITY;
                let it: Vec<&(Vec<f32>, f32)> = if order {
                    parts.iter().rev().collect()
                } else {
                    parts.iter().collect()
                };
                for (o, lse) in it {
                    merge_into(&mut acc, &mut acc_lse, o, *lse);
                }
                assert!(
                    (acc_lse as f64 - whole_lse).abs() < 1e-5,
                    "lse {acc_lse} vs {whole_lse}"
                );
                for j in 0..d {
                    assert!((acc[j] as f64 - whole_o[j]).abs() < 1e-5 * (1.0 + whole_o[j].abs()));
                }
            }
        }
    }

    #[test]
    fn empty_partial_is_identity() {
        let mut acc = vec![1.0, 2.0];
        let mut lse = 0.5;
        merge_into(&mut acc, &mut lse, &[9.0, 9.0], f32::NEG_INFINITY);
        assert_eq!((acc.as_slice(), lse), ([1.0, 2.0].as_slice(), 0.5));
        let mut acc = vec![0.0, 0.0];
        let mut lse = f32::NEG_INFINITY;
        merge_into(&mut acc, &mut lse, &[3.0, 4.0], 1.5);
        assert_eq!((acc.as_slice(), lse), ([3.0, 4.0].as_slice(), 1.5));
    }
}
