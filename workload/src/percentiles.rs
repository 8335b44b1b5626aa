//! Percentiles of latency samples, interpolated linearly between the closest ranks (NumPy's
//! default), so small samples still give a value between two observed ones.

use serde::Serialize;

/// The `p`-th percentile (0 to 100) of `sorted`, which must be in ascending order; `None` when it
/// is empty.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    debug_assert!(sorted.windows(2).all(|w| w[0] <= w[1]), "sorted input");
    let last = sorted.len().checked_sub(1)?;
    let rank = p.clamp(0.0, 100.0) / 100.0 * last as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    Some(sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64))
}

/// The percentiles the report shows, in the unit of the samples; all `None` without samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
}

impl Summary {
    pub fn of(mut samples: Vec<f64>) -> Self {
        samples.sort_by(f64::total_cmp);
        Summary {
            p50: percentile(&samples, 50.0),
            p90: percentile(&samples, 90.0),
            p99: percentile(&samples, 99.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_values_on_known_inputs() {
        let one_to_ten: Vec<f64> = (1..=10).map(f64::from).collect();
        // Rank p/100 * 9: 4.5, 8.1 and 8.91 between the 0-based positions.
        assert_eq!(percentile(&one_to_ten, 50.0), Some(5.5));
        assert!((percentile(&one_to_ten, 90.0).unwrap() - 9.1).abs() < 1e-12);
        assert!((percentile(&one_to_ten, 99.0).unwrap() - 9.91).abs() < 1e-12);
        assert_eq!(percentile(&one_to_ten, 0.0), Some(1.0));
        assert_eq!(percentile(&one_to_ten, 100.0), Some(10.0));

        let hundred_and_one: Vec<f64> = (0..=100).map(f64::from).collect();
        assert_eq!(percentile(&hundred_and_one, 99.0), Some(99.0));
        assert_eq!(percentile(&[7.0], 90.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn summary_sorts_its_samples() {
        let s = Summary::of(vec![40.0, 10.0, 30.0, 20.0]);
        assert_eq!(s.p50, Some(25.0));
        assert!((s.p90.unwrap() - 37.0).abs() < 1e-12);
        assert!((s.p99.unwrap() - 39.7).abs() < 1e-12);
        assert_eq!(Summary::of(Vec::new()).p99, None);
    }
}
