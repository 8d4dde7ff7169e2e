//! Decides whether the demo went as expected: what was seen in each act against what should have been
//! seen, the summary table and the verdict (pure).

use std::collections::BTreeMap;

/// What the demo saw, filled in as it goes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observations {
    /// v1 reached Healthy with all its replicas ready.
    pub v1_healthy: bool,
    /// Canary weights v2's steps asked for, in order, without repeats.
    pub v2_weights: Vec<i32>,
    /// Canary weights v2 actually got (replica counts round them), in order, without repeats.
    pub v2_actual_weights: Vec<i32>,
    /// Analysis runs of v2 that ended Successful, and those that ended otherwise.
    pub v2_runs_successful: usize,
    pub v2_runs_unsuccessful: usize,
    /// v2 became the stable version and the rollout Healthy.
    pub v2_promoted: bool,
    /// v2's share of recent traffic once promoted.
    pub v2_share_after_promotion: Option<f64>,
    /// v3's final phase and message.
    pub v3_phase: Option<String>,
    pub v3_message: Option<String>,
    /// Index of the step v3 stood at when it aborted.
    pub v3_abort_step: Option<i32>,
    /// The phase of v3's failed analysis run, if one failed.
    pub v3_failed_run: Option<String>,
    /// The highest canary error rate Prometheus reported during v3's analysis.
    pub v3_error_rate: Option<f64>,
    /// v2's share of recent traffic after the abort.
    pub v2_share_after_abort: Option<f64>,
}

/// Index of the first analysis step in the demo's Rollout.
pub const FIRST_ANALYSIS_STEP: i32 = 1;
/// Shares at or above this count as "all traffic" (the simulator splits exactly; this only absorbs float
/// rounding).
pub const ALL_TRAFFIC: f64 = 0.999;

/// `weights` followed by 100 unless it already ends there.
pub fn ending_at_full(mut weights: Vec<i32>) -> Vec<i32> {
    if weights.last() != Some(&100) {
        weights.push(100);
    }
    weights
}

/// One row of the summary table.
#[derive(Clone, Debug, PartialEq)]
pub struct Check {
    pub what: &'static str,
    pub expected: String,
    pub seen: String,
    pub ok: bool,
}

fn percent(share: Option<f64>) -> String {
    share.map_or("no traffic seen".into(), |s| format!("{:.0}%", s * 100.0))
}

/// The rows, in the order the demo's acts happen.
pub fn checks(seen: &Observations) -> Vec<Check> {
    let arrows = |weights: &[i32]| {
        if weights.is_empty() {
            "none".to_string()
        } else {
            weights
                .iter()
                .filter(|w| **w > 0)
                .map(|w| format!("{w}%"))
                .collect::<Vec<_>>()
                .join(" -> ")
        }
    };
    let weights = if seen.v2_actual_weights.is_empty() || seen.v2_actual_weights == seen.v2_weights
    {
        arrows(&seen.v2_weights)
    } else {
        format!(
            "{} (pods: {})",
            arrows(&seen.v2_weights),
            arrows(&seen.v2_actual_weights)
        )
    };
    let stepped = {
        let expected = [20, 50, 80];
        let mut position = 0;
        for weight in &seen.v2_weights {
            if position < expected.len() && *weight == expected[position] {
                position += 1;
            }
        }
        position == expected.len()
    };
    vec![
        Check {
            what: "v1 deployed",
            expected: "Healthy".into(),
            seen: if seen.v1_healthy {
                "Healthy"
            } else {
                "not Healthy"
            }
            .into(),
            ok: seen.v1_healthy,
        },
        Check {
            what: "v2 canary steps",
            expected: "20% -> 50% -> 80% -> 100%".into(),
            seen: weights,
            ok: stepped,
        },
        Check {
            what: "v2 analysis",
            expected: "2 runs, all Successful".into(),
            seen: format!(
                "{} Successful, {} not",
                seen.v2_runs_successful, seen.v2_runs_unsuccessful
            ),
            ok: seen.v2_runs_successful >= 2 && seen.v2_runs_unsuccessful == 0,
        },
        Check {
            what: "v2 promoted",
            expected: "stable, 100% of traffic".into(),
            seen: if seen.v2_promoted {
                format!("stable, {}", percent(seen.v2_share_after_promotion))
            } else {
                "not promoted".into()
            },
            ok: seen.v2_promoted
                && seen
                    .v2_share_after_promotion
                    .is_some_and(|s| s >= ALL_TRAFFIC),
        },
        Check {
            what: "v3 analysis",
            expected: format!("Failed at step {FIRST_ANALYSIS_STEP} (error rate >= 5%)"),
            seen: match (&seen.v3_failed_run, seen.v3_abort_step) {
                (Some(phase), Some(step)) => format!(
                    "{phase} at step {step}{}",
                    seen.v3_error_rate
                        .map(|r| format!(" (error rate {:.1}%)", r * 100.0))
                        .unwrap_or_default()
                ),
                (Some(phase), None) => phase.clone(),
                (None, _) => "no failed run".into(),
            },
            ok: seen.v3_failed_run.as_deref() == Some("Failed")
                && seen.v3_abort_step == Some(FIRST_ANALYSIS_STEP),
        },
        Check {
            what: "v3 aborted",
            expected: "Aborted by analysis".into(),
            seen: match (&seen.v3_phase, &seen.v3_message) {
                (Some(phase), Some(message)) if message.contains("analysis") => {
                    format!("{phase} by analysis")
                }
                (Some(phase), _) => phase.clone(),
                (None, _) => "not aborted".into(),
            },
            ok: seen.v3_phase.as_deref() == Some("Aborted")
                && seen
                    .v3_message
                    .as_deref()
                    .is_some_and(|m| m.contains("analysis")),
        },
        Check {
            what: "traffic back on v2",
            expected: "100%".into(),
            seen: percent(seen.v2_share_after_abort),
            ok: seen.v2_share_after_abort.is_some_and(|s| s >= ALL_TRAFFIC),
        },
    ]
}

/// `Ok` when every check passed, else the first failed check as a reason.
pub fn verdict(checks: &[Check]) -> Result<(), String> {
    match checks.iter().find(|check| !check.ok) {
        None => Ok(()),
        Some(failed) => Err(format!(
            "{}: expected {}, saw {}",
            failed.what, failed.expected, failed.seen
        )),
    }
}

/// The table, columns aligned.
pub fn render(checks: &[Check]) -> String {
    let width = |column: fn(&Check) -> usize, title: &str| {
        checks
            .iter()
            .map(column)
            .max()
            .unwrap_or(0)
            .max(title.len())
    };
    let what = width(|c| c.what.len(), "what");
    let expected = width(|c| c.expected.len(), "expected");
    let seen = width(|c| c.seen.len(), "seen");
    let mut out = format!(
        "  {:what$}  {:expected$}  {:seen$}  result\n",
        "what", "expected", "seen"
    );
    for check in checks {
        out.push_str(&format!(
            "  {:what$}  {:expected$}  {:seen$}  {}\n",
            check.what,
            check.expected,
            check.seen,
            if check.ok { "ok" } else { "FAILED" }
        ));
    }
    out
}

/// Traffic shares keyed by pod-template hash, named by version where the hash is known.
pub fn share_line(shares: &BTreeMap<String, f64>, names: &BTreeMap<String, String>) -> String {
    if shares.is_empty() {
        return "no traffic yet".into();
    }
    let mut parts: Vec<(String, f64)> = shares
        .iter()
        .map(|(hash, share)| {
            let name = names
                .get(hash)
                .cloned()
                .unwrap_or_else(|| format!("hash {hash}"));
            (name, *share)
        })
        .collect();
    parts.sort_by(|a, b| a.0.cmp(&b.0));
    parts
        .iter()
        .map(|(name, share)| format!("{name} {:.0}%", share * 100.0))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn everything_as_expected() -> Observations {
        Observations {
            v1_healthy: true,
            v2_weights: vec![20, 50, 80, 100],
            v2_actual_weights: vec![20, 60, 80, 100],
            v2_runs_successful: 2,
            v2_runs_unsuccessful: 0,
            v2_promoted: true,
            v2_share_after_promotion: Some(1.0),
            v3_phase: Some("Aborted".into()),
            v3_message: Some("analysis failed".into()),
            v3_abort_step: Some(1),
            v3_failed_run: Some("Failed".into()),
            v3_error_rate: Some(0.25),
            v2_share_after_abort: Some(1.0),
        }
    }

    #[test]
    fn everything_as_expected_passes() {
        let checks = checks(&everything_as_expected());
        assert!(checks.iter().all(|c| c.ok), "{checks:#?}");
        assert_eq!(verdict(&checks), Ok(()));
    }

    #[test]
    fn each_deviation_fails_with_its_reason() {
        type Breakage = fn(&mut Observations);
        let cases: Vec<(&str, Breakage)> = vec![
            ("v1 deployed", |o| o.v1_healthy = false),
            ("v2 canary steps", |o| o.v2_weights = vec![20, 100]),
            ("v2 analysis", |o| o.v2_runs_unsuccessful = 1),
            ("v2 analysis", |o| o.v2_runs_successful = 1),
            ("v2 promoted", |o| o.v2_share_after_promotion = Some(0.8)),
            ("v3 analysis", |o| o.v3_abort_step = Some(3)),
            ("v3 analysis", |o| {
                o.v3_failed_run = Some("Inconclusive".into())
            }),
            ("v3 aborted", |o| o.v3_phase = Some("Paused".into())),
            ("v3 aborted", |o| {
                o.v3_message = Some("aborted by a user".into())
            }),
            ("traffic back on v2", |o| o.v2_share_after_abort = Some(0.8)),
            ("traffic back on v2", |o| o.v2_share_after_abort = None),
        ];
        for (what, break_it) in cases {
            let mut seen = everything_as_expected();
            break_it(&mut seen);
            let reason = verdict(&checks(&seen)).unwrap_err();
            assert!(reason.starts_with(what), "{what}: {reason}");
        }
    }

    #[test]
    fn weights_may_repeat_or_interleave_but_must_pass_each_step() {
        let mut seen = everything_as_expected();
        seen.v2_weights = vec![0, 20, 50, 50, 80, 100];
        assert_eq!(verdict(&checks(&seen)), Ok(()));
        let row = &checks(&seen)[1];
        assert_eq!(
            row.seen,
            "20% -> 50% -> 50% -> 80% -> 100% (pods: 20% -> 60% -> 80% -> 100%)"
        );
        seen.v2_weights = vec![20, 80, 100];
        assert!(verdict(&checks(&seen)).is_err());
    }

    #[test]
    fn promotion_ends_at_full_weight_once() {
        assert_eq!(ending_at_full(vec![20, 50, 80]), vec![20, 50, 80, 100]);
        assert_eq!(ending_at_full(vec![20, 100]), vec![20, 100]);
        assert_eq!(ending_at_full(vec![]), vec![100]);
    }

    #[test]
    fn the_table_is_aligned() {
        let table = render(&checks(&everything_as_expected()));
        let columns: Vec<usize> = table
            .lines()
            .map(|line| line.find("  ok").or(line.find("  result")).unwrap())
            .collect();
        assert!(columns.windows(2).all(|w| w[0] == w[1]), "{table}");
    }

    #[test]
    fn shares_are_named_by_version() {
        let shares = BTreeMap::from([("aaa".to_string(), 0.8), ("bbb".to_string(), 0.2)]);
        let names = BTreeMap::from([("aaa".to_string(), "v2".to_string())]);
        assert_eq!(share_line(&shares, &names), "hash bbb 20%, v2 80%");
        assert_eq!(share_line(&BTreeMap::new(), &names), "no traffic yet");
    }
}
