//! Decides how a version answers each request: error or not, and how long it takes, spread so that
//! error rates and latency quantiles are exact over a window instead of noisy.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::workload::parse_duration;

/// Pod-template annotation: fraction of requests answered 500 (e.g. `"0.2"`).
pub const ANNOTATION_ERROR_RATE: &str = "sim.serin.dev/error-rate";
/// Pod-template annotation: median response time (e.g. `"20ms"`).
pub const ANNOTATION_LATENCY_P50: &str = "sim.serin.dev/latency-p50";
/// Pod-template annotation: 99th percentile response time (e.g. `"300ms"`).
pub const ANNOTATION_LATENCY_P99: &str = "sim.serin.dev/latency-p99";

/// z such that P(Z <= z) = 0.99 for a standard normal Z.
const Z_99: f64 = 2.326_347_874_040_841;
/// The golden-ratio sequence fills [0, 1) more evenly than random numbers do.
const GOLDEN: f64 = 0.618_033_988_749_894_9;

/// How a pod answers: its error rate and a log-normal response time fitted to p50 and p99.
#[derive(Debug, Clone, PartialEq)]
pub struct ResponseProfile {
    pub error_rate: f64,
    pub latency_p50: Duration,
    pub latency_p99: Duration,
}

impl Default for ResponseProfile {
    fn default() -> Self {
        ResponseProfile {
            error_rate: 0.0,
            latency_p50: Duration::from_millis(10),
            latency_p99: Duration::from_millis(50),
        }
    }
}

impl ResponseProfile {
    /// Unparseable values keep the defaults: a typo must not stop the traffic.
    pub fn from_annotations(annotations: &BTreeMap<String, String>) -> ResponseProfile {
        let defaults = ResponseProfile::default();
        let duration = |key: &str| annotations.get(key).and_then(|v| parse_duration(v).ok());
        ResponseProfile {
            error_rate: annotations
                .get(ANNOTATION_ERROR_RATE)
                .and_then(|v| v.trim().parse::<f64>().ok())
                .filter(|v| v.is_finite())
                .map_or(defaults.error_rate, |v| v.clamp(0.0, 1.0)),
            latency_p50: duration(ANNOTATION_LATENCY_P50).unwrap_or(defaults.latency_p50),
            latency_p99: duration(ANNOTATION_LATENCY_P99).unwrap_or(defaults.latency_p99),
        }
    }

    /// The response time at quantile `u` of the log-normal through p50 and p99 (seconds).
    pub fn latency_at(&self, u: f64) -> f64 {
        let p50 = self.latency_p50.as_secs_f64().max(1e-6);
        let p99 = self.latency_p99.as_secs_f64().max(p50);
        let sigma = (p99.ln() - p50.ln()) / Z_99;
        (p50.ln() + sigma * inverse_normal_cdf(u.clamp(1e-9, 1.0 - 1e-9))).exp()
    }
}

/// Inverse of the standard normal CDF (Acklam's rational approximation, relative error < 1.2e-9).
pub fn inverse_normal_cdf(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    const P_LOW: f64 = 0.024_25;
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p <= 0.0 {
        f64::NEG_INFINITY
    } else if p >= 1.0 {
        f64::INFINITY
    } else if p < P_LOW {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - P_LOW {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

/// One answered request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Answer {
    pub code: u16,
    pub seconds: f64,
}

/// Per-series answer generator: errors from an accumulator (exactly `rate` of any run, within one
/// request), latency quantiles from the golden-ratio sequence.
#[derive(Debug, Clone, Default)]
pub struct Responder {
    error_credit: f64,
    sequence: u64,
}

impl Responder {
    pub fn answer(&mut self, profile: &ResponseProfile) -> Answer {
        self.error_credit += profile.error_rate;
        let code = if self.error_credit >= 1.0 - 1e-9 {
            self.error_credit -= 1.0;
            500
        } else {
            200
        };
        self.sequence = self.sequence.wrapping_add(1);
        let u = (0.5 + self.sequence as f64 * GOLDEN).fract();
        Answer {
            code,
            seconds: profile.latency_at(u),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inverse_normal_matches_known_quantiles() {
        assert!(inverse_normal_cdf(0.5).abs() < 1e-9);
        assert!((inverse_normal_cdf(0.99) - Z_99).abs() < 1e-6);
        assert!((inverse_normal_cdf(0.01) + Z_99).abs() < 1e-6);
        assert!((inverse_normal_cdf(0.975) - 1.959_963_985).abs() < 1e-6);
    }

    #[test]
    fn error_rate_is_exact_and_latency_quantiles_fit() {
        let profile = ResponseProfile {
            error_rate: 0.2,
            latency_p50: Duration::from_millis(20),
            latency_p99: Duration::from_millis(300),
        };
        let mut r = Responder::default();
        let answers: Vec<Answer> = (0..1000).map(|_| r.answer(&profile)).collect();
        assert_eq!(answers.iter().filter(|a| a.code == 500).count(), 200);
        let mut seconds: Vec<f64> = answers.iter().map(|a| a.seconds).collect();
        seconds.sort_by(f64::total_cmp);
        assert!((seconds[500] - 0.020).abs() < 0.002, "p50 {}", seconds[500]);
        assert!((seconds[990] - 0.300).abs() < 0.03, "p99 {}", seconds[990]);
    }

    #[test]
    fn annotations_override_defaults_and_garbage_is_ignored() {
        let a = BTreeMap::from([
            (ANNOTATION_ERROR_RATE.to_string(), "0.5".to_string()),
            (ANNOTATION_LATENCY_P50.to_string(), "fast".to_string()),
            (ANNOTATION_LATENCY_P99.to_string(), "1s".to_string()),
        ]);
        let p = ResponseProfile::from_annotations(&a);
        assert_eq!(p.error_rate, 0.5);
        assert_eq!(p.latency_p50, Duration::from_millis(10));
        assert_eq!(p.latency_p99, Duration::from_secs(1));
        let wild = BTreeMap::from([(ANNOTATION_ERROR_RATE.to_string(), "7".to_string())]);
        assert_eq!(ResponseProfile::from_annotations(&wild).error_rate, 1.0);
    }
}
