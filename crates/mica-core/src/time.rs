//! Timestamps.

use std::time::{SystemTime, UNIX_EPOCH};

use ::time::macros::format_description;
use ::time::{OffsetDateTime, PrimitiveDateTime};

/// `YYYY-MM-DDTHH:MM:SSZ`: `t` in UTC (proleptic Gregorian), truncated to the second. Times
/// outside the years -9999..=9999 are clamped to that range.
pub fn iso_utc(t: SystemTime) -> String {
    // Whole seconds, rounded down (also before 1970).
    let secs: i64 = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => {
            let d = e.duration();
            let whole = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
            -whole - i64::from(d.subsec_nanos() > 0)
        }
    };
    let dt = OffsetDateTime::from_unix_timestamp(secs).unwrap_or(if secs < 0 {
        PrimitiveDateTime::MIN.assume_utc()
    } else {
        PrimitiveDateTime::MAX.assume_utc()
    });
    let format = format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    dt.format(&format)
        .expect("the format has only components every OffsetDateTime has")
}

#[cfg(test)]
mod tests {
    use super::iso_utc;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn known_instants() {
        let at = |s: u64| UNIX_EPOCH + Duration::from_secs(s);
        assert_eq!(iso_utc(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(iso_utc(at(1_709_251_199)), "2024-02-29T23:59:59Z");
        assert_eq!(iso_utc(at(1_700_000_000)), "2023-11-14T22:13:20Z");
        assert_eq!(iso_utc(at(951_782_400)), "2000-02-29T00:00:00Z");
        assert_eq!(iso_utc(at(86_399) + Duration::from_millis(999)), "1970-01-01T23:59:59Z");
        assert_eq!(iso_utc(UNIX_EPOCH - Duration::from_millis(1)), "1969-12-31T23:59:59Z");
        assert_eq!(iso_utc(UNIX_EPOCH - Duration::from_secs(86_400)), "1969-12-31T00:00:00Z");
    }
}
