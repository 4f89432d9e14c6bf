//! What a log line may carry from a client: text escaped so that it cannot
//! forge or hide another line, and tokens shortened; and how often a line
//! that a stranger can provoke is said ([`Every`]).
//!
//! A control character (a newline, an escape sequence) in a client's field
//! could start a fake log line or repaint a terminal; an invisible
//! formatting character (U+202E, the right-to-left override, above all)
//! reorders how the rest of the line is shown. [`Escaped`] writes both as
//! `\u{…}` and everything else as is, without the quotes `Debug` would add,
//! so text and JSON logs keep their plain values.

use std::fmt::{self, Display, Write};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// Unicode characters that change how the text around them is shown
/// without showing themselves: the soft hyphen, the bidirectional marks
/// (U+061C, U+200E, U+200F), embeddings and overrides (U+202A to U+202E)
/// and isolates (U+2066 to U+2069), and the zero-width and other invisible
/// ones (U+180E, U+200B to U+200D, U+2060 to U+206F, U+FEFF, U+FFF9 to
/// U+FFFB). Also the line and paragraph separators (U+2028, U+2029), which
/// are not controls but break a line in many viewers (a forged log line),
/// and the tag characters (U+E0000 to U+E007F), invisible letters that can
/// smuggle a whole hidden text past a reader.
pub fn is_invisible_format(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{061C}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{2028}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}'
            | '\u{E0000}'..='\u{E007F}'
    )
}

/// A client's text, for a log field: `%Escaped(&text)`.
pub struct Escaped<'a>(pub &'a str);

impl Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            if c.is_control() || is_invisible_format(c) {
                write!(f, "{}", c.escape_unicode())?;
            } else {
                f.write_char(c)?;
            }
        }
        Ok(())
    }
}

/// A token shortened (and escaped) for logs: enough to tell two apart,
/// never the whole.
pub fn redact(token: &str) -> String {
    let head: String = token.chars().take(6).collect();
    let head = Escaped(&head);
    if token.chars().count() > 6 {
        format!("{head}…")
    } else {
        head.to_string()
    }
}

/// A token shortened to its first 8 and last 4 characters: enough to tell
/// two apart and to find one in a log, not enough to push to it.
pub fn short_token(token: &str) -> String {
    let chars: Vec<char> = token.chars().collect();
    if chars.len() <= 12 {
        return Escaped(token).to_string();
    }
    let head: String = chars[..8].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{}…{}", Escaped(&head), Escaped(&tail))
}

/// A warning that a stranger, or an outage, can make happen at any rate
/// (a request from outside `--pbx-allow`, a readiness check while Redis is
/// down, an accept out of descriptors): said at most once per interval,
/// with how many times it happened, so the log stays readable and its disk
/// unfilled.
pub struct Every {
    interval: Duration,
    /// When the line was last said, and the times since, unsaid.
    said: Mutex<(Option<Instant>, u64)>,
}

/// How often a warning kept by [`Every::seldom`] is said, at most.
pub const SELDOM: Duration = Duration::from_secs(10);

impl Every {
    /// At most once per [`SELDOM`]: every such warning of the server.
    pub const fn seldom() -> Every {
        Every::new(SELDOM)
    }

    pub const fn new(interval: Duration) -> Every {
        Every {
            interval,
            said: Mutex::new((None, 0)),
        }
    }

    /// Counts one time it happened; when the line is due now, how many
    /// times it happened since it was last said, this one included.
    pub fn due(&self) -> Option<u64> {
        let now = Instant::now();
        let mut said = self.said.lock().unwrap_or_else(PoisonError::into_inner);
        said.1 += 1;
        if said
            .0
            .is_some_and(|at| now.duration_since(at) < self.interval)
        {
            return None;
        }
        let times = said.1;
        *said = (Some(now), 0);
        Some(times)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_line_is_said_once_per_interval_with_its_count() {
        let every = Every::new(Duration::from_secs(10));
        assert_eq!(every.due(), Some(1), "the first time is said");
        for _ in 0..4 {
            assert_eq!(every.due(), None);
        }
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert_eq!(every.due(), None);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(every.due(), Some(6), "five held back, and this one");
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(every.due(), Some(1));
    }

    #[test]
    fn control_and_invisible_characters_are_escaped_and_the_rest_kept() {
        assert_eq!(
            Escaped("call\n\u{202E}evil é-1").to_string(),
            "call\\u{a}\\u{202e}evil é-1"
        );
        assert_eq!(Escaped("plain").to_string(), "plain");
        assert_eq!(
            Escaped("a\u{2028}b\u{2029}c\u{E0041}\u{E007F}").to_string(),
            "a\\u{2028}b\\u{2029}c\\u{e0041}\\u{e007f}"
        );
    }

    #[test]
    fn redact_keeps_only_a_prefix() {
        assert_eq!(redact("abcdefghijkl"), "abcdef…");
        assert_eq!(redact("abc"), "abc");
    }

    #[test]
    fn invisible_formatting_characters_are_recognised() {
        for c in [
            '\u{202A}',
            '\u{202E}',
            '\u{2066}',
            '\u{2069}',
            '\u{200E}',
            '\u{200F}',
            '\u{061C}',
            '\u{200B}',
            '\u{FEFF}',
            '\u{2028}',
            '\u{2029}',
            '\u{E0000}',
            '\u{E0041}',
            '\u{E007F}',
        ] {
            assert!(is_invisible_format(c), "{c:?}");
        }
        for c in [
            'a',
            '0',
            '-',
            ':',
            '_',
            'é',
            '\u{05D0}',
            '\u{2027}',
            '\u{E0080}',
        ] {
            assert!(!is_invisible_format(c), "{c:?}");
        }
    }
}
