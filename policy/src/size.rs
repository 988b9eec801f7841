//! # Human-readable byte sizes
//!
//! Configuration keys such as `handler.ram.max_size` accept either a bare integer (bytes) or a
//! string made of a whole number and an optional unit:
//!
//! | unit                         | factor        |
//! |------------------------------|---------------|
//! | (none), `B`                  | 1             |
//! | `K`, `KiB` / `KB`            | 1024 / 1000   |
//! | `M`, `MiB` / `MB`            | 1024² / 1000² |
//! | `G`, `GiB` / `GB`            | 1024³ / 1000³ |
//! | `T`, `TiB` / `TB`            | 1024⁴ / 1000⁴ |
//! | `P`, `PiB` / `PB`            | 1024⁵ / 1000⁵ |
//!
//! Units are case-insensitive, a single-letter unit is binary (as in `truncate -s 1G`), and
//! whitespace between number and unit is allowed (`"64 GiB"`). Fractions and negative numbers
//! are refused, and so is anything that overflows 64 bits.
//!
//! This module only parses; it never decides whether a size is acceptable.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, Visitor};

/// A size in bytes, deserialized from an integer or a human-readable string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

/// Why a size string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// Nothing to parse.
    #[error("empty size")]
    Empty,
    /// The number part is missing or not a whole number.
    #[error("{0:?} does not start with a whole number of bytes")]
    NotANumber(String),
    /// The unit is not one of the known ones.
    #[error("unknown size unit {unit:?} (use B, KiB, MiB, GiB, TiB, PiB, KB, MB, GB, TB or PB)")]
    UnknownUnit {
        /// The unit as written.
        unit: String,
    },
    /// The value does not fit in 64 bits.
    #[error("{0:?} is too large")]
    Overflow(String),
}

/// Parses a human-readable size (see the module documentation).
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(SizeError::Empty);
    }
    let digits_end = text
        .char_indices()
        .find(|(_, c)| !c.is_ascii_digit() && *c != '_')
        .map_or(text.len(), |(i, _)| i);
    let (number, unit) = text.split_at(digits_end);
    let number: String = number.chars().filter(|c| *c != '_').collect();
    if number.is_empty() {
        return Err(SizeError::NotANumber(text.to_owned()));
    }
    let value: u64 = number
        .parse()
        .map_err(|_| SizeError::Overflow(text.to_owned()))?;
    let unit = unit.trim();
    let factor = unit_factor(unit).ok_or_else(|| {
        if unit.starts_with('.') || unit.starts_with(',') {
            SizeError::NotANumber(text.to_owned())
        } else {
            SizeError::UnknownUnit {
                unit: unit.to_owned(),
            }
        }
    })?;
    value
        .checked_mul(factor)
        .ok_or_else(|| SizeError::Overflow(text.to_owned()))
}

fn unit_factor(unit: &str) -> Option<u64> {
    let unit = unit.to_ascii_lowercase();
    let (exp, binary) = match unit.as_str() {
        "" | "b" => return Some(1),
        "k" | "kib" => (1, true),
        "kb" => (1, false),
        "m" | "mib" => (2, true),
        "mb" => (2, false),
        "g" | "gib" => (3, true),
        "gb" => (3, false),
        "t" | "tib" => (4, true),
        "tb" => (4, false),
        "p" | "pib" => (5, true),
        "pb" => (5, false),
        _ => return None,
    };
    let base: u64 = if binary { 1024 } else { 1000 };
    base.checked_pow(exp)
}

/// Formats a byte count with the largest binary unit that divides it exactly.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(&str, u64); 5] = [
        ("PiB", 1 << 50),
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (name, factor) in UNITS {
        if bytes != 0 && bytes % factor == 0 {
            return format!("{}{name}", bytes / factor);
        }
    }
    format!("{bytes}B")
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;

        impl Visitor<'_> for SizeVisitor {
            type Value = ByteSize;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size in bytes, as an integer or a string like \"64GiB\"")
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("size {v} is negative")))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                parse_size(v).map(ByteSize).map_err(E::custom)
            }
        }

        deserializer.deserialize_any(SizeVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("4KB"), Ok(4000));
        assert_eq!(parse_size("64GiB"), Ok(64 << 30));
        assert_eq!(parse_size("64 gib"), Ok(64 << 30));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("3MB"), Ok(3_000_000));
        assert_eq!(parse_size("1_000"), Ok(1000));
        assert_eq!(parse_size("1TiB"), Ok(1 << 40));
        assert_eq!(parse_size("1PB"), Ok(1_000_000_000_000_000));
    }

    #[test]
    fn refusals() {
        assert_eq!(parse_size(""), Err(SizeError::Empty));
        assert!(matches!(parse_size("GiB"), Err(SizeError::NotANumber(_))));
        assert!(matches!(
            parse_size("1.5GiB"),
            Err(SizeError::NotANumber(_))
        ));
        assert!(matches!(parse_size("-1"), Err(SizeError::NotANumber(_))));
        assert!(matches!(
            parse_size("12 parsecs"),
            Err(SizeError::UnknownUnit { .. })
        ));
        assert!(matches!(
            parse_size("99999999999999999999"),
            Err(SizeError::Overflow(_))
        ));
        assert!(matches!(
            parse_size("17000000PiB"),
            Err(SizeError::Overflow(_))
        ));
    }

    #[test]
    fn formatting() {
        assert_eq!(format_size(64 << 30), "64GiB");
        assert_eq!(format_size(1536), "1536B");
        assert_eq!(format_size(3 << 20), "3MiB");
        assert_eq!(format_size(0), "0B");
        assert_eq!(format_size(1000), "1000B");
    }
}
