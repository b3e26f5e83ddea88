//! The server keeps times as Unix seconds; ISO 8601 text comes from [`mica_core::time::iso_utc`].

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The instant `unix` seconds after (or, negative, before) the Unix epoch.
pub fn from_unix(unix: i64) -> SystemTime {
    let d = Duration::from_secs(unix.unsigned_abs());
    if unix >= 0 {
        UNIX_EPOCH + d
    } else {
        UNIX_EPOCH - d
    }
}

#[cfg(test)]
mod tests {
    use mica_core::time::iso_utc;

    #[test]
    fn iso_utc_matches_known_instants() {
        let iso = |unix| iso_utc(super::from_unix(unix));
        assert_eq!(iso(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(iso(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(iso(-1), "1969-12-31T23:59:59Z");
    }
}
