//! Durations in manifests: an integer number of seconds or a Go-style string such as `90s`, `2m`, `1h30m`.

use std::fmt;
use std::time::Duration;

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a duration in a manifest could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DurationError {
    #[error("duration {0:?} is empty")]
    Empty(String),
    #[error("duration {0:?} is negative; durations must be zero or more")]
    Negative(String),
    #[error("duration {0:?} is not a number of seconds or a string like 30s, 5m or 1h30m")]
    Malformed(String),
    #[error("duration {0:?} is longer than {MAX_DURATION_SECS} seconds (68 years)")]
    TooLong(String),
}

impl DurationError {
    /// A bounded label for metrics and event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            DurationError::Empty(_) => "empty",
            DurationError::Negative(_) => "negative",
            DurationError::Malformed(_) => "malformed",
            DurationError::TooLong(_) => "too_long",
        }
    }
}

/// A duration as written by the user: `30` (seconds) or `"30s"`, `"2m"`, `"1h30m"`, `"250ms"`.
///
/// Keeps the user's spelling so that the object round-trips unchanged (GitOps tools compare it).
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum ManifestDuration {
    Seconds(i64),
    Text(String),
}

/// The longest duration accepted, as for every `...Seconds` field (an `int32`): a time that far ahead is
/// still a valid timestamp, and nothing added to it overflows.
pub const MAX_DURATION_SECS: u64 = i32::MAX as u64;

/// The pattern the API server checks for the string form; it cannot express a negative value.
pub const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$|^[0-9]+$";

impl ManifestDuration {
    /// A duration of whole seconds.
    pub fn from_secs(secs: u64) -> Self {
        ManifestDuration::Text(format!("{secs}s"))
    }

    /// The duration, or why it cannot be read.
    pub fn to_duration(&self) -> Result<Duration, DurationError> {
        match self {
            ManifestDuration::Seconds(s) if *s < 0 => Err(DurationError::Negative(s.to_string())),
            ManifestDuration::Seconds(s) if s.unsigned_abs() > MAX_DURATION_SECS => {
                Err(DurationError::TooLong(s.to_string()))
            }
            ManifestDuration::Seconds(s) => Ok(Duration::from_secs(s.unsigned_abs())),
            ManifestDuration::Text(t) => parse_duration(t),
        }
    }
}

/// Parses `90`, `90s`, `1.5m`, `1h30m`, `250ms` (and the `us`/`µs`, `ns` units Go spells).
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(DurationError::Empty(text.to_string()));
    }
    if trimmed.starts_with('-') {
        return Err(DurationError::Negative(text.to_string()));
    }
    if trimmed.bytes().all(|b| b.is_ascii_digit()) {
        return match trimmed.parse::<u64>() {
            Ok(secs) if secs <= MAX_DURATION_SECS => Ok(Duration::from_secs(secs)),
            _ => Err(DurationError::TooLong(text.to_string())),
        };
    }
    let malformed = || DurationError::Malformed(text.to_string());
    let mut total = 0f64;
    let mut rest = trimmed;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(malformed)?;
        if number_len == 0 {
            return Err(malformed());
        }
        let value: f64 = rest[..number_len].parse().map_err(|_| malformed())?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let factor = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(malformed()),
        };
        total += value * factor;
        rest = &rest[unit_len..];
    }
    if !total.is_finite() || total > MAX_DURATION_SECS as f64 {
        return Err(DurationError::TooLong(text.to_string()));
    }
    Ok(Duration::from_secs_f64(total))
}

impl fmt::Debug for ManifestDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for ManifestDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ManifestDuration::Seconds(s) => write!(f, "{s}s"),
            ManifestDuration::Text(t) => f.write_str(t),
        }
    }
}

impl Serialize for ManifestDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            ManifestDuration::Seconds(s) => serializer.serialize_i64(*s),
            ManifestDuration::Text(t) => serializer.serialize_str(t),
        }
    }
}

impl<'de> Deserialize<'de> for ManifestDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(i64),
            Text(String),
        }
        Ok(match Raw::deserialize(deserializer)? {
            Raw::Int(i) => ManifestDuration::Seconds(i),
            Raw::Text(t) => ManifestDuration::Text(t),
        })
    }
}

impl JsonSchema for ManifestDuration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ManifestDuration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        // allOf, not anyOf: in a structural schema the branches carry no type, so `minimum` only
        // constrains integers and `pattern` only strings; with anyOf a negative integer passes the pattern
        // branch (and "-5s" the minimum branch) vacuously.
        json_schema!({
            "x-kubernetes-int-or-string": true,
            "allOf": [
                {"minimum": 0, "maximum": MAX_DURATION_SECS},
                {"pattern": DURATION_PATTERN}
            ]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_forms_users_write() {
        let cases = [
            ("30", 30.0),
            ("30s", 30.0),
            ("2m", 120.0),
            ("1h30m", 5400.0),
            ("250ms", 0.25),
            ("1.5m", 90.0),
            ("0s", 0.0),
            ("1500us", 0.0015),
            ("250µs", 0.00025),
        ];
        for (text, secs) in cases {
            assert_eq!(parse_duration(text).unwrap().as_secs_f64(), secs, "{text}");
        }
    }

    #[test]
    fn rejects_negative_and_malformed() {
        assert_eq!(
            parse_duration("-5s"),
            Err(DurationError::Negative("-5s".into()))
        );
        assert_eq!(parse_duration(""), Err(DurationError::Empty("".into())));
        for bad in ["5x", "s", "m5", "1h 2m", "1..2s"] {
            assert!(
                matches!(parse_duration(bad), Err(DurationError::Malformed(_))),
                "{bad}"
            );
        }
        assert_eq!(
            ManifestDuration::Seconds(-1).to_duration(),
            Err(DurationError::Negative("-1".into()))
        );
    }

    #[test]
    fn durations_past_the_int32_seconds_limit_are_too_long_not_malformed() {
        for long in [
            "999999999h",
            "2147483648",
            "18446744073709551616",
            "99999999999999999999s",
        ] {
            assert_eq!(
                parse_duration(long),
                Err(DurationError::TooLong(long.into())),
                "{long}"
            );
        }
        assert_eq!(
            ManifestDuration::Seconds(i64::MAX).to_duration(),
            Err(DurationError::TooLong(i64::MAX.to_string()))
        );
        assert_eq!(
            parse_duration("2147483647").map(|d| d.as_secs()),
            Ok(MAX_DURATION_SECS)
        );
        assert!(matches!(
            parse_duration("1e400s"),
            Err(DurationError::Malformed(_))
        ));
    }

    #[test]
    fn round_trips_the_users_spelling() {
        for raw in [r#"30"#, r#""1h30m""#] {
            let parsed: ManifestDuration = serde_json::from_str(raw).unwrap();
            assert_eq!(serde_json::to_string(&parsed).unwrap(), raw);
        }
    }
}
