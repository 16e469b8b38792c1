//! UTC calendar days as a day number, written `YYYY-MM-DD` (no date library for one format).

use std::time::{SystemTime, UNIX_EPOCH};

use lumen_plugins::civil::{civil_from_days, days_from_civil, days_in_month};

/// Days since 1970-01-01, UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Day(pub i64);

impl Day {
    pub fn today() -> Day {
        Day::at(SystemTime::now())
    }

    pub fn at(t: SystemTime) -> Day {
        let secs = match t.duration_since(UNIX_EPOCH) {
            Ok(d) => d.as_secs() as i64,
            Err(e) => -(e.duration().as_secs() as i64) - 1,
        };
        Day(secs.div_euclid(86_400))
    }

    /// `YYYY-MM-DD` (a real date: month and day ranges checked).
    pub fn parse(text: &str) -> Option<Day> {
        let b = text.as_bytes();
        if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
            return None;
        }
        let num = |s: &str| -> Option<i64> {
            s.bytes()
                .all(|c| c.is_ascii_digit())
                .then(|| s.parse().ok())?
        };
        let (y, m, d) = (num(&text[..4])?, num(&text[5..7])?, num(&text[8..])?);
        if !(1..=12).contains(&m) || d < 1 || d > days_in_month(y, m) {
            return None;
        }
        Some(Day(days_from_civil(y, m, d)))
    }

    pub fn minus(self, days: i64) -> Day {
        Day(self.0 - days)
    }

    /// Days from `self` to `later`, inclusive of both.
    pub fn span(self, later: Day) -> i64 {
        later.0 - self.0 + 1
    }
}

impl std::fmt::Display for Day {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (y, m, d) = civil_from_days(self.0);
        write!(f, "{y:04}-{m:02}-{d:02}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn formats_and_parses_known_dates() {
        assert_eq!(Day(0).to_string(), "1970-01-01");
        assert_eq!(Day::parse("2000-02-29").unwrap().to_string(), "2000-02-29");
        assert_eq!(Day::parse("2026-11-23"), Some(Day(20_780)));
        let t = UNIX_EPOCH + Duration::from_secs(20_780 * 86_400 + 86_399);
        assert_eq!(Day::at(t).to_string(), "2026-11-23");
        for bad in [
            "2026-02-29",
            "2026-13-01",
            "2026-1-01",
            "20261123",
            "2026-11-2x",
            "",
        ] {
            assert_eq!(Day::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn round_trips_through_its_text() {
        for n in (-150_000..150_000).step_by(7) {
            let day = Day(n);
            assert_eq!(Day::parse(&day.to_string()), Some(day), "{day}");
        }
    }
}
