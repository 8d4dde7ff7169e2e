//! Decides how many whole requests each target gets per tick so that cumulative counts never stray
//! more than one request from their exact share (fractional accumulators with largest remainder).

use std::collections::BTreeMap;

/// Carries each target's fractional credit from tick to tick.
#[derive(Debug, Clone)]
pub struct Apportioner<K: Ord + Clone> {
    credits: BTreeMap<K, f64>,
}

impl<K: Ord + Clone> Default for Apportioner<K> {
    fn default() -> Self {
        Apportioner {
            credits: BTreeMap::new(),
        }
    }
}

impl<K: Ord + Clone> Apportioner<K> {
    /// Hands out exactly `total` requests over `weights` (non-positive and non-finite weights get
    /// nothing). Targets that disappear lose their credit. With no usable weight, nothing is handed out.
    pub fn apportion(&mut self, total: u64, weights: &[(K, f64)]) -> Vec<(K, u64)> {
        let usable = |w: f64| w.is_finite() && w > 0.0;
        let sum: f64 = weights.iter().map(|(_, w)| *w).filter(|w| usable(*w)).sum();
        if sum <= 0.0 {
            self.credits.clear();
            return Vec::new();
        }
        let mut rows: Vec<(K, f64, u64)> = Vec::with_capacity(weights.len());
        for (key, weight) in weights {
            if !usable(*weight) || rows.iter().any(|(k, _, _)| k == key) {
                continue;
            }
            let credit =
                self.credits.get(key).copied().unwrap_or(0.0) + total as f64 * weight / sum;
            let whole = credit.floor().max(0.0) as u64;
            rows.push((key.clone(), credit - whole as f64, whole));
        }
        let handed: u64 = rows.iter().map(|(_, _, n)| *n).sum();
        if handed < total {
            let mut order: Vec<usize> = (0..rows.len()).collect();
            order.sort_by(|a, b| rows[*b].1.total_cmp(&rows[*a].1));
            for i in order.iter().cycle().take((total - handed) as usize) {
                rows[*i].1 -= 1.0;
                rows[*i].2 += 1;
            }
        } else if handed > total {
            let mut excess = handed - total;
            // Bounded: each pass takes at least one request while any target still holds one.
            while excess > 0 {
                let mut order: Vec<usize> = (0..rows.len()).filter(|i| rows[*i].2 > 0).collect();
                if order.is_empty() {
                    break;
                }
                order.sort_by(|a, b| rows[*a].1.total_cmp(&rows[*b].1));
                for i in order.into_iter().take(excess as usize) {
                    rows[i].1 += 1.0;
                    rows[i].2 -= 1;
                    excess -= 1;
                }
            }
        }
        self.credits = rows
            .iter()
            .map(|(k, credit, _)| (k.clone(), *credit))
            .collect();
        rows.into_iter().map(|(k, _, n)| (k, n)).collect()
    }
}

/// Turns a steady rate into whole requests per tick, carrying the fraction over.
#[derive(Debug, Clone, Default)]
pub struct RateAccumulator {
    credit: f64,
}

impl RateAccumulator {
    pub fn take(&mut self, requests: f64) -> u64 {
        if requests.is_finite() && requests > 0.0 {
            self.credit += requests;
        }
        let whole = self.credit.floor().max(0.0);
        self.credit -= whole;
        whole as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ninety_ten_is_exact_over_ten_requests() {
        let mut a = Apportioner::default();
        let mut counts = BTreeMap::new();
        for _ in 0..10 {
            for (k, n) in a.apportion(1, &[("stable", 90.0), ("canary", 10.0)]) {
                *counts.entry(k).or_insert(0) += n;
            }
        }
        assert_eq!(counts.get("stable"), Some(&9));
        assert_eq!(counts.get("canary"), Some(&1));
    }

    #[test]
    fn zero_weights_get_nothing_and_no_weights_hand_out_nothing() {
        let mut a = Apportioner::default();
        let out = a.apportion(10, &[("a", 1.0), ("b", 0.0), ("c", f64::NAN)]);
        assert_eq!(out, vec![("a", 10)]);
        assert!(a.apportion(10, &[("a", 0.0)]).is_empty());
    }

    #[test]
    fn rate_accumulator_keeps_fractions() {
        let mut r = RateAccumulator::default();
        let total: u64 = (0..30).map(|_| r.take(0.1 * 3.3333)).sum();
        assert_eq!(total, 9); // 30 * 0.33333 = 9.9999
    }

    proptest! {
        #[test]
        fn counts_sum_to_total_and_stay_within_one_request(
            weights in proptest::collection::vec(0.0f64..100.0, 1..6),
            ticks in proptest::collection::vec(0u64..50, 1..60),
        ) {
            let keyed: Vec<(usize, f64)> = weights.iter().copied().enumerate().collect();
            let sum: f64 = weights.iter().sum();
            prop_assume!(sum > 1e-6);
            let mut a = Apportioner::default();
            let mut cumulative = vec![0u64; weights.len()];
            let mut sent = 0u64;
            for total in ticks {
                let out = a.apportion(total, &keyed);
                prop_assert_eq!(out.iter().map(|(_, n)| *n).sum::<u64>(), total);
                for (k, n) in out {
                    cumulative[k] += n;
                }
                sent += total;
                for (k, w) in weights.iter().enumerate() {
                    let ideal = sent as f64 * w / sum;
                    prop_assert!((cumulative[k] as f64 - ideal).abs() <= 1.0 + 1e-6,
                        "target {} got {} of ideal {}", k, cumulative[k], ideal);
                }
            }
        }
    }
}
