//! How the commands show values to an operator: times as UTC, tokens
//! shortened, rows as an aligned table. Text a client sent (tokens, device
//! names) is escaped, so it cannot repaint the operator's terminal.

pub use crate::logs::short_token;

/// Milliseconds since the Unix epoch as `2025-06-01 12:00:00 UTC`.
pub fn utc(millis: i64) -> String {
    let t = Civil::from_millis(millis);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
        t.year, t.month, t.day, t.hour, t.minute, t.second
    )
}

/// Milliseconds since the Unix epoch as RFC 3339, `2025-06-01T12:00:00.123Z`.
pub fn rfc3339(millis: i64) -> String {
    let t = Civil::from_millis(millis);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year, t.month, t.day, t.hour, t.minute, t.second, t.millis
    )
}

/// A moment in the proleptic Gregorian calendar, UTC.
struct Civil {
    year: i64,
    month: u32,
    day: u32,
    hour: i64,
    minute: i64,
    second: i64,
    millis: i64,
}

impl Civil {
    /// Howard Hinnant's `civil_from_days`: exact for every `i64` day count
    /// a stored time can give, without a date crate.
    fn from_millis(millis: i64) -> Civil {
        let days = millis.div_euclid(86_400_000);
        let in_day = millis.rem_euclid(86_400_000);
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        Civil {
            year,
            month: u32::try_from(month).expect("a month is 1 to 12"),
            day: u32::try_from(day).expect("a day is 1 to 31"),
            hour: in_day / 3_600_000,
            minute: in_day / 60_000 % 60,
            second: in_day / 1000 % 60,
            millis: in_day % 1000,
        }
    }
}

/// Rows under a header, each column as wide as its widest cell, two spaces
/// apart; no trailing spaces.
pub fn table<const N: usize>(header: [&str; N], rows: &[[String; N]]) -> String {
    let mut widths = header.map(|h| h.chars().count());
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; N]| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            out.push_str(cell);
            if i + 1 < N {
                let pad = widths[i] - cell.chars().count() + 2;
                out.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.trim_end().to_owned()
    };
    let mut out = line(header);
    for row in rows {
        out.push('\n');
        out.push_str(&line(row.each_ref().map(String::as_str)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_utc_calendar_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_700_000_000_123), "2023-11-14 22:13:20 UTC");
        assert_eq!(rfc3339(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(utc(4_107_542_399_000), "2100-02-28 23:59:59 UTC");
    }

    #[test]
    fn tokens_keep_their_first_8_and_last_4_characters() {
        assert_eq!(short_token("0123456789abcdefXYZW"), "01234567…XYZW");
        assert_eq!(short_token("short-token"), "short-token");
        assert_eq!(short_token("ab\u{1b}[2J"), "ab\\u{1b}[2J");
    }

    #[test]
    fn a_table_is_aligned_by_its_widest_cells() {
        let rows = [
            ["android".to_owned(), "a".to_owned()],
            ["gcm".to_owned(), "bé…c".to_owned()],
        ];
        assert_eq!(
            table(["PLATFORM", "X"], &rows),
            "PLATFORM  X\nandroid   a\ngcm       bé…c"
        );
    }
}
