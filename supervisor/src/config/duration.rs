//! # Human-readable durations
//!
//! Timing keys of the configuration (`daemon.heartbeat_interval`, ...) take a string made of a
//! whole number and a unit: `ms`, `s`, `m` (minutes) or `h`, e.g. `"100ms"`, `"5s"`, `"10m"`.
//! Whitespace between number and unit is allowed. A bare number is refused rather than guessed
//! (seconds? milliseconds?), and so are fractions, negative numbers and overflow.
//!
//! This module only parses; it never decides whether a duration is acceptable.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserialize, Deserializer, Visitor};

/// A duration deserialized from a string such as `"5s"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// The number part is missing or not a whole number.
    #[error("{0:?} does not start with a whole number")]
    NotANumber(String),
    /// No unit, or an unknown one.
    #[error("{0:?} needs a unit: ms, s, m or h (e.g. \"5s\")")]
    Unit(String),
    /// Too large.
    #[error("{0:?} is too large")]
    Overflow(String),
}

/// Parses a human-readable duration (see the module documentation).
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let t = text.trim();
    let end = t
        .char_indices()
        .find(|(_, c)| !c.is_ascii_digit() && *c != '_')
        .map_or(t.len(), |(i, _)| i);
    let (number, unit) = t.split_at(end);
    let number: String = number.chars().filter(|c| *c != '_').collect();
    if number.is_empty() {
        return Err(DurationError::NotANumber(t.to_owned()));
    }
    let n: u64 = number
        .parse()
        .map_err(|_| DurationError::Overflow(t.to_owned()))?;
    let millis_per = match unit.trim() {
        "ms" => 1,
        "s" => 1000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        _ => return Err(DurationError::Unit(t.to_owned())),
    };
    n.checked_mul(millis_per)
        .map(Duration::from_millis)
        .ok_or_else(|| DurationError::Overflow(t.to_owned()))
}

/// Formats a duration the way the configuration writes it (`"250ms"`, `"5s"`, `"10m"`).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms % 3_600_000 == 0 && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms % 60_000 == 0 && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = HumanDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"5s\" or \"100ms\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<HumanDuration, E> {
                parse_duration(v).map(HumanDuration).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<HumanDuration, E> {
                Err(E::custom(format!(
                    "{v} has no unit: write \"{v}s\" or \"{v}ms\""
                )))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<HumanDuration, E> {
                Err(E::custom(format!(
                    "{v} has no unit: write \"{v}s\" or \"{v}ms\""
                )))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_duration("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_duration(" 5 s "), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1_000ms"), Ok(Duration::from_secs(1)));
        assert!(matches!(parse_duration("5"), Err(DurationError::Unit(_))));
        assert!(matches!(
            parse_duration("5 days"),
            Err(DurationError::Unit(_))
        ));
        assert!(matches!(
            parse_duration("1.5s"),
            Err(DurationError::Unit(_))
        ));
        assert!(matches!(
            parse_duration("-1s"),
            Err(DurationError::NotANumber(_))
        ));
        assert!(matches!(
            parse_duration("s"),
            Err(DurationError::NotANumber(_))
        ));
        assert!(matches!(
            parse_duration("99999999999999999999h"),
            Err(DurationError::Overflow(_))
        ));
        assert!(matches!(
            parse_duration("18446744073709551615h"),
            Err(DurationError::Overflow(_))
        ));
    }

    #[test]
    fn formats_round_trip() {
        for text in ["250ms", "5s", "10m", "2h", "0s", "1500ms"] {
            assert_eq!(format_duration(parse_duration(text).unwrap()), text);
        }
    }
}
