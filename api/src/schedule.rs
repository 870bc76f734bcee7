//! Cron schedules, in UTC or in a named time zone: when batch jobs and reports run.
//!
//! A schedule is a cron expression of 5 fields (minute first) or 6 (seconds first),
//! optionally preceded by `CRON_TZ=<zone>` or `TZ=<zone>` with an IANA zone name
//! (`CRON_TZ=Europe/Berlin 0 7 * * MON`). Without a zone it is UTC. In a zone, the
//! fields are wall-clock times there, and daylight saving time is handled as cron
//! does: a time that falls in the spring-forward gap runs at the first minute after
//! it, and a time that happens twice in the autumn runs once, at the first.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::Cron;

/// A parsed cron schedule, and the text it came from.
#[derive(Debug, Clone)]
pub(crate) struct Schedule {
    text: String,
    cron: Cron,
    zone: Option<Tz>,
}

impl Schedule {
    /// Parses `[CRON_TZ=zone] <cron expression>`.
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let trimmed = text.trim();
        let (zone, expr) = match trimmed
            .strip_prefix("CRON_TZ=")
            .or_else(|| trimmed.strip_prefix("TZ="))
        {
            Some(rest) => {
                let (name, expr) = rest.split_once(char::is_whitespace).ok_or_else(|| {
                    format!("'{text}' names a time zone but has no cron expression after it")
                })?;
                let zone = Tz::from_str(name).map_err(|_| {
                    format!(
                        "'{name}' is not a time zone name (use IANA names such as Europe/Berlin)"
                    )
                })?;
                (Some(zone), expr.trim())
            }
            None => (None, trimmed),
        };
        let cron =
            Cron::from_str(expr).map_err(|e| format!("'{expr}' is not a cron expression: {e}"))?;
        Ok(Self {
            text: trimmed.to_owned(),
            cron,
            zone,
        })
    }

    /// The text it was parsed from.
    pub(crate) fn text(&self) -> &str {
        &self.text
    }

    /// The first time strictly after `after` the schedule fires.
    pub(crate) fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self.zone {
            None => self.cron.find_next_occurrence(&after, false).ok(),
            Some(zone) => self
                .cron
                .find_next_occurrence(&after.with_timezone(&zone), false)
                .ok()
                .map(|t| t.with_timezone(&Utc)),
        }
    }

    /// [`Self::next_after`] in milliseconds since the epoch.
    pub(crate) fn next_after_ms(&self, after_ms: i64) -> Option<i64> {
        let after = DateTime::from_timestamp_millis(after_ms)?;
        self.next_after(after).map(|t| t.timestamp_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn next(schedule: &str, after: &str) -> String {
        Schedule::parse(schedule)
            .unwrap()
            .next_after(at(after))
            .unwrap()
            .to_rfc3339()
    }

    #[test]
    fn month_ends_and_leap_days_are_found() {
        // The 31st skips the months without one.
        assert_eq!(
            next("0 6 31 * *", "2026-04-01T00:00:00Z"),
            "2026-05-31T06:00:00+00:00"
        );
        // The last day of the month, whatever its length.
        assert_eq!(
            next("0 6 L * *", "2027-02-01T00:00:00Z"),
            "2027-02-28T06:00:00+00:00"
        );
        assert_eq!(
            next("0 6 L * *", "2028-02-01T00:00:00Z"),
            "2028-02-29T06:00:00+00:00"
        );
        // The 29th of February waits for a leap year.
        assert_eq!(
            next("0 0 29 2 *", "2026-03-01T00:00:00Z"),
            "2028-02-29T00:00:00+00:00"
        );
        // New year, and strictly after: a time on the schedule is not its own next.
        assert_eq!(
            next("0 0 1 1 *", "2026-12-31T23:59:00Z"),
            "2027-01-01T00:00:00+00:00"
        );
        assert_eq!(
            next("0 0 1 1 *", "2027-01-01T00:00:00Z"),
            "2028-01-01T00:00:00+00:00"
        );
    }

    #[test]
    fn a_named_zone_follows_its_wall_clock_across_daylight_saving_time() {
        // 07:00 in Berlin is 06:00 UTC in winter and 05:00 UTC in summer.
        let s = "CRON_TZ=Europe/Berlin 0 7 * * *";
        assert_eq!(next(s, "2026-03-28T12:00:00Z"), "2026-03-29T05:00:00+00:00");
        assert_eq!(next(s, "2026-03-27T12:00:00Z"), "2026-03-28T06:00:00+00:00");
        // 02:30 does not exist on 2026-03-29 in Berlin: it runs at 03:00 CEST (01:00 UTC).
        assert_eq!(
            next("TZ=Europe/Berlin 30 2 * * *", "2026-03-28T23:00:00Z"),
            "2026-03-29T01:00:00+00:00"
        );
        // 02:30 happens twice on 2026-10-25: it runs once, at the first (00:30 UTC).
        let s = "CRON_TZ=Europe/Berlin 30 2 * * *";
        assert_eq!(next(s, "2026-10-24T23:00:00Z"), "2026-10-25T00:30:00+00:00");
        assert_eq!(next(s, "2026-10-25T00:30:00Z"), "2026-10-26T01:30:00+00:00");
        // New York changes on other dates than Europe.
        assert_eq!(
            next(
                "CRON_TZ=America/New_York 0 9 * * MON",
                "2026-03-07T00:00:00Z"
            ),
            "2026-03-09T13:00:00+00:00"
        );
    }

    #[test]
    fn bad_schedules_say_what_is_wrong() {
        let e = Schedule::parse("every monday").unwrap_err();
        assert!(e.contains("'every monday' is not a cron expression"), "{e}");
        let e = Schedule::parse("CRON_TZ=Mars/Olympus 0 7 * * *").unwrap_err();
        assert!(e.contains("'Mars/Olympus' is not a time zone"), "{e}");
        let e = Schedule::parse("CRON_TZ=Europe/Berlin").unwrap_err();
        assert!(e.contains("no cron expression"), "{e}");
        let e = Schedule::parse("0 25 * * *").unwrap_err();
        assert!(e.contains("is not a cron expression"), "{e}");
    }
}
