//! Decides replica counts: weights to pod counts, maxSurge/maxUnavailable, and how far each ReplicaSet may
//! be scaled this reconcile without dropping available pods below the floor.

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// Why a count or percentage could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplicaMathError {
    #[error("{0:?} is not a number or a percentage such as 25%")]
    MalformedPercent(String),
    #[error("{0} must not be negative")]
    Negative(String),
}

impl ReplicaMathError {
    /// A bounded label for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            ReplicaMathError::MalformedPercent(_) => "malformed_percent",
            ReplicaMathError::Negative(_) => "negative",
        }
    }
}

/// Resolves an int-or-percent against `total`, rounding percentages up or down.
pub fn resolve_int_or_percent(
    value: &IntOrString,
    total: i32,
    round_up: bool,
) -> Result<i32, ReplicaMathError> {
    match value {
        IntOrString::Int(n) if *n < 0 => Err(ReplicaMathError::Negative(n.to_string())),
        IntOrString::Int(n) => Ok(*n),
        IntOrString::String(text) => {
            let trimmed = text.trim();
            let number = trimmed.strip_suffix('%').unwrap_or(trimmed);
            let percent: i64 = number
                .parse()
                .map_err(|_| ReplicaMathError::MalformedPercent(text.clone()))?;
            if percent < 0 {
                return Err(ReplicaMathError::Negative(text.clone()));
            }
            if !trimmed.ends_with('%') {
                return i32::try_from(percent)
                    .map_err(|_| ReplicaMathError::MalformedPercent(text.clone()));
            }
            let scaled = i64::from(total.max(0)) * percent;
            let value = if round_up {
                (scaled + 99) / 100
            } else {
                scaled / 100
            };
            i32::try_from(value).map_err(|_| ReplicaMathError::MalformedPercent(text.clone()))
        }
    }
}

/// maxSurge in pods (default 25%, rounded up).
pub fn max_surge(value: Option<&IntOrString>, total: i32) -> Result<i32, ReplicaMathError> {
    match value {
        Some(v) => resolve_int_or_percent(v, total, true),
        None => resolve_int_or_percent(&IntOrString::String("25%".into()), total, true),
    }
}

/// maxUnavailable in pods (default 0, rounded down).
pub fn max_unavailable(value: Option<&IntOrString>, total: i32) -> Result<i32, ReplicaMathError> {
    match value {
        Some(v) => resolve_int_or_percent(v, total, false),
        None => Ok(0),
    }
}

/// Pods of `total` that carry `weight` percent: ceil(total * weight / 100).
pub fn pods_for_weight(total: i32, weight: i32) -> i32 {
    let total = i64::from(total.max(0));
    let weight = i64::from(weight.clamp(0, 100));
    ((total * weight + 99) / 100) as i32
}

/// Available canary pods a router may send `weight` percent to (safety rule 1): ceil(N*w/100), at least one
/// pod for any non-zero weight.
pub fn canary_pods_needed(total: i32, weight: i32) -> i32 {
    if weight <= 0 || total <= 0 {
        0
    } else {
        pods_for_weight(total, weight).max(1)
    }
}

/// Canary pods to run beside a full stable of `total` pods (no router: traffic follows pods) so that the
/// canary's share comes closest to `weight` without exceeding it by more than one pod's share: at least one
/// pod for a non-zero weight, at most `cap` (the surge allowed). A weight of 100 gets `cap`: beside a full
/// stable that is as close as pods come before the promotion.
pub fn surge_pods_for_weight(total: i32, weight: i32, cap: i32) -> i32 {
    let cap = cap.max(1);
    if weight <= 0 || total <= 0 {
        return 0;
    }
    if weight >= 100 {
        return cap;
    }
    let (n, w) = (i64::from(total), i64::from(weight));
    let below = w * n / (100 - w);
    let above = below + 1;
    // |share(c) - w| with share(c) = 100c/(n+c), compared without division.
    let miss = |c: i64| (100 * c - w * (n + c)).abs();
    let pods = if miss(below) * (n + above) <= miss(above) * (n + below) {
        below
    } else {
        above
    };
    i32::try_from(pods.max(1)).unwrap_or(i32::MAX).min(cap)
}

/// The largest weight `available` canary pods can carry under [`canary_pods_needed`].
pub fn max_weight_carried(total: i32, available: i32) -> i32 {
    if available <= 0 {
        return 0;
    }
    if total <= 0 || available >= total {
        return 100;
    }
    // floor(available * 100 / total) always satisfies ceil(total*w/100) <= available.
    (i64::from(available) * 100 / i64::from(total)) as i32
}

/// Current weight without a router: share of ready canary pods among ready pods behind the stable Service.
pub fn ratio_weight(canary_ready: i32, stable_ready: i32) -> i32 {
    let canary = i64::from(canary_ready.max(0));
    let total = canary + i64::from(stable_ready.max(0));
    if total == 0 {
        return 0;
    }
    ((canary * 200 + total) / (total * 2)) as i32
}

/// One ReplicaSet as the scaler sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScaleInput {
    /// `spec.replicas` (as it stands after earlier actions of this plan).
    pub spec: i32,
    /// Available pods, never more than `spec` (a shrinking ReplicaSet's status may lag behind).
    pub available: i32,
    /// Where it should end up.
    pub target: i32,
    /// Held at its current size (a scale-down delay is running).
    pub hold: bool,
}

/// Replica counts for a canary without a router, where traffic follows pods: scale-ups within maxSurge,
/// scale-downs only as far as available pods stay at or above `total - max_unavailable` (safety rule 3).
/// `others` are scaled down first (oldest first, in the given order), then the canary, then the stable.
/// Returns the new specs in the order stable, canary, others.
pub fn scale_without_router(
    total: i32,
    surge: i32,
    unavailable: i32,
    stable: &ScaleInput,
    canary: Option<&ScaleInput>,
    others: &[ScaleInput],
) -> (i32, Option<i32>, Vec<i32>) {
    // Saturating: a ReplicaSet scaled by hand (the scale subresource) can carry any int32, and a sum of
    // such counts must not overflow.
    let floor = total.saturating_sub(unavailable).max(0);
    let ceiling = total.saturating_add(surge.max(0));
    let mut stable_new = if !stable.hold && stable.spec < stable.target {
        stable.target
    } else {
        stable.spec
    };
    let others_spec: i32 = others.iter().map(|o| o.spec).fold(0, i32::saturating_add);
    let mut canary_new = canary.map(|c| {
        if !c.hold && c.spec < c.target {
            let room = ceiling
                .saturating_sub(stable_new)
                .saturating_sub(others_spec);
            c.target.min(c.spec.max(room)).max(c.spec)
        } else {
            c.spec
        }
    });
    let mut budget = stable
        .available
        .min(stable.spec)
        .saturating_add(canary.map(|c| c.available.min(c.spec)).unwrap_or(0))
        .saturating_add(
            others
                .iter()
                .map(|o| o.available.min(o.spec))
                .fold(0, i32::saturating_add),
        )
        .saturating_sub(floor)
        .max(0);
    let mut shrink = |input: &ScaleInput, current: i32| -> i32 {
        if input.hold || current <= input.target {
            return current;
        }
        let want = current - input.target;
        let not_available = (input.spec - input.available.min(input.spec)).max(0);
        let free = want.min(not_available);
        let paid = (want - free).min(budget);
        budget -= paid;
        current - free - paid
    };
    let others_new: Vec<i32> = others.iter().map(|o| shrink(o, o.spec)).collect();
    if let (Some(c), Some(current)) = (canary, canary_new) {
        canary_new = Some(shrink(c, current));
    }
    stable_new = shrink(stable, stable_new);
    (stable_new, canary_new, others_new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_sets_scaled_by_hand_to_int32_max_do_not_overflow_the_sums() {
        let huge = rs(i32::MAX, i32::MAX, 0);
        let (stable, canary, others) = scale_without_router(
            i32::MAX,
            i32::MAX,
            0,
            &rs(i32::MAX, i32::MAX, i32::MAX),
            Some(&rs(0, 0, 5)),
            &[huge.clone(), huge],
        );
        assert_eq!(
            stable,
            i32::MAX,
            "the stable is never shrunk below its traffic"
        );
        assert_eq!(canary, Some(0), "no room above a saturated ceiling");
        assert_eq!(others.len(), 2);
    }

    fn rs(spec: i32, available: i32, target: i32) -> ScaleInput {
        ScaleInput {
            spec,
            available,
            target,
            hold: false,
        }
    }

    #[test]
    fn percentages_round_as_documented() {
        let cases = [
            (IntOrString::String("25%".into()), 10, true, 3),
            (IntOrString::String("25%".into()), 10, false, 2),
            (IntOrString::String("10%".into()), 1, true, 1),
            (IntOrString::String("10%".into()), 1, false, 0),
            (IntOrString::Int(2), 10, true, 2),
            (IntOrString::String("3".into()), 10, true, 3),
        ];
        for (value, total, up, want) in cases {
            assert_eq!(
                resolve_int_or_percent(&value, total, up),
                Ok(want),
                "{value:?} of {total}"
            );
        }
        assert!(resolve_int_or_percent(&IntOrString::String("x%".into()), 10, true).is_err());
        assert!(resolve_int_or_percent(&IntOrString::Int(-1), 10, true).is_err());
        assert_eq!(max_surge(None, 10), Ok(3));
        assert_eq!(max_unavailable(None, 10), Ok(0));
    }

    #[test]
    fn weight_to_pods() {
        let cases = [
            (10, 0, 0, 0),
            (10, 5, 1, 1),
            (10, 20, 2, 2),
            (10, 25, 3, 3),
            (3, 50, 2, 2),
            (0, 50, 0, 0),
            (1, 1, 1, 1),
            (10, 100, 10, 10),
        ];
        for (total, weight, pods, needed) in cases {
            assert_eq!(
                pods_for_weight(total, weight),
                pods,
                "pods {total} {weight}"
            );
            assert_eq!(
                canary_pods_needed(total, weight),
                needed,
                "needed {total} {weight}"
            );
        }
    }

    #[test]
    fn max_weight_carried_never_exceeds_what_pods_support() {
        for total in 0..30 {
            for available in 0..=total + 1 {
                let w = max_weight_carried(total, available);
                assert!(
                    canary_pods_needed(total, w) <= available.max(0) || w == 0,
                    "{total} {available} {w}"
                );
            }
        }
        assert_eq!(max_weight_carried(10, 3), 30);
    }

    #[test]
    fn surge_pods_keep_the_share_within_one_pod_of_the_weight() {
        // The cases a user meets first: one replica at 50% is one pod each; three at 20% is one canary pod.
        assert_eq!(surge_pods_for_weight(1, 50, 1), 1);
        assert_eq!(surge_pods_for_weight(3, 20, 1), 1);
        assert_eq!(surge_pods_for_weight(4, 25, 4), 1);
        assert_eq!(surge_pods_for_weight(4, 50, 4), 4);
        assert_eq!(surge_pods_for_weight(10, 50, 3), 3);
        assert_eq!(surge_pods_for_weight(4, 0, 4), 0);
        assert_eq!(surge_pods_for_weight(0, 50, 4), 0);
        assert_eq!(surge_pods_for_weight(4, 100, 2), 2);
        for total in 1..40 {
            for weight in 1..100 {
                let pods = surge_pods_for_weight(total, weight, i32::MAX);
                assert!(pods >= 1, "{total} {weight}");
                let share = ratio_weight(pods, total);
                let one_pod = 100.0 / f64::from(total + pods);
                assert!(
                    f64::from(share) <= f64::from(weight) + one_pod + 0.5,
                    "{total} pods at {weight}%: {pods} canary pods carry {share}%"
                );
                assert!(share < 100, "{total} {weight}");
            }
        }
    }

    #[test]
    fn ratio_weight_rounds() {
        assert_eq!(ratio_weight(0, 0), 0);
        assert_eq!(ratio_weight(1, 2), 33);
        assert_eq!(ratio_weight(2, 1), 67);
        assert_eq!(ratio_weight(5, 5), 50);
        assert_eq!(ratio_weight(3, 0), 100);
    }

    #[test]
    fn canary_surges_first_then_stable_shrinks_by_what_canary_has_available() {
        // N=10, 20%: canary 2, stable 8. Surge 3 lets the canary start at full size.
        let (s, c, _) = scale_without_router(10, 3, 0, &rs(10, 10, 8), Some(&rs(0, 0, 2)), &[]);
        assert_eq!((s, c), (10, Some(2)));
        // Canary not yet available: stable must stay (rule 3).
        let (s, c, _) = scale_without_router(10, 3, 0, &rs(10, 10, 8), Some(&rs(2, 0, 2)), &[]);
        assert_eq!((s, c), (10, Some(2)));
        // One canary pod available: stable may drop by one.
        let (s, _, _) = scale_without_router(10, 3, 0, &rs(10, 10, 8), Some(&rs(2, 1, 2)), &[]);
        assert_eq!(s, 9);
        let (s, _, _) = scale_without_router(10, 3, 0, &rs(9, 9, 8), Some(&rs(2, 2, 2)), &[]);
        assert_eq!(s, 8);
    }

    #[test]
    fn surge_limits_the_canary_and_max_unavailable_allows_early_shrink() {
        // N=10, 50%, surge 1: canary may only add one pod above N.
        let (s, c, _) = scale_without_router(10, 1, 0, &rs(10, 10, 5), Some(&rs(0, 0, 5)), &[]);
        assert_eq!((s, c), (10, Some(1)));
        // maxUnavailable 2: stable may shrink by 2 before the canary has anything available.
        let (s, c, _) = scale_without_router(10, 0, 2, &rs(10, 10, 5), Some(&rs(0, 0, 5)), &[]);
        assert_eq!((s, c), (8, Some(0)));
        // Then the canary fills the room freed below N.
        let (_, c, _) = scale_without_router(10, 0, 2, &rs(8, 8, 5), Some(&rs(0, 0, 5)), &[]);
        assert_eq!(c, Some(2));
    }

    #[test]
    fn unavailable_pods_go_first_and_held_sets_stay() {
        // An old canary with no available pods can go at once; a held one cannot.
        let (_, _, others) = scale_without_router(10, 3, 0, &rs(10, 10, 10), None, &[rs(4, 0, 0)]);
        assert_eq!(others, vec![0]);
        let held = ScaleInput {
            hold: true,
            ..rs(4, 4, 0)
        };
        let (_, _, others) = scale_without_router(10, 3, 0, &rs(10, 10, 10), None, &[held]);
        assert_eq!(others, vec![4]);
        // Old canary carrying traffic: only as much as stable brings back.
        let (s, _, others) = scale_without_router(10, 3, 0, &rs(6, 6, 10), None, &[rs(4, 4, 0)]);
        assert_eq!((s, others), (10, vec![4]));
        let (_, _, others) = scale_without_router(10, 3, 0, &rs(10, 8, 10), None, &[rs(4, 4, 0)]);
        assert_eq!(others, vec![2]);
    }
}
