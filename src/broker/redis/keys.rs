//! What the Redis broker writes: key and channel names, the state's text,
//! the published message, and the command that stores a pending state.
//!
//! `cn:{<unique_key>}` holds the state (`pending:<platform>`,
//! `available:<platform>`, `unavailable:<platform>`, see
//! [`CallState::encode`]); `cn:{<unique_key>}:answer` is the channel. The
//! braces are a Redis Cluster hash tag: key and channel always share a slot.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use crate::broker::{Answer, CallState};
use crate::store::Platform;

/// The Redis key that holds the state of `key`.
pub fn state_key(key: &str) -> String {
    format!("cn:{{{key}}}")
}

/// The channel an answer to `key` is published on.
pub fn channel(key: &str) -> String {
    format!("cn:{{{key}}}:answer")
}

/// The key a channel carries answers for.
pub(super) fn key_of_channel(channel: &str) -> Option<&str> {
    channel.strip_prefix("cn:{")?.strip_suffix("}:answer")
}

/// `SET cn:{key} pending:<platform> PX <until> NX`: stores the pending state
/// of a wait, keeping whatever Redis already has (an answer must never turn
/// pending again). It expires with the wait: an answer that comes later
/// finds no key (404) even while the clean-up of the wait is still queued,
/// and a crashed process leaves nothing behind.
pub fn set_pending(key: &str, platform: Platform, until: Instant) -> redis::Cmd {
    // PX 0 is an error; a wait that just ended keeps its key a millisecond.
    let ttl = until
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    let ttl = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    let mut cmd = redis::cmd("SET");
    cmd.arg(state_key(key))
        .arg(CallState::Pending { platform }.encode())
        .arg("PX")
        .arg(ttl)
        .arg("NX");
    cmd
}

/// Stores an answer only over a pending state, then publishes it (`PUBLISH`,
/// or `SPUBLISH` on a cluster: ARGV[4]): one round trip, atomic, and the
/// first answer stands. Returns the state before.
pub(super) const ANSWER_SCRIPT: &str = r#"
local before = redis.call('GET', KEYS[1])
if not before then return false end
if string.sub(before, 1, 8) == 'pending:' then
  redis.call('SET', KEYS[1], ARGV[1] .. string.sub(before, 8), 'KEEPTTL')
  redis.call(ARGV[4], ARGV[2], ARGV[3])
end
return before
"#;

/// The published message: `1` or `0` for available, a space, and when the
/// answer reached us in Unix microseconds (for the wake-up latency metric).
pub(super) fn encode_message(available: bool, at: SystemTime) -> String {
    let micros = at
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0);
    format!("{} {micros}", u8::from(available))
}

pub(super) fn decode_message(payload: &[u8]) -> Option<Answer> {
    let text = std::str::from_utf8(payload).ok()?;
    let (flag, micros) = text.split_once(' ').unwrap_or((text, ""));
    let available = match flag {
        "1" => true,
        "0" => false,
        _ => return None,
    };
    let received_at = micros
        .parse::<u64>()
        .ok()
        .map(|m| UNIX_EPOCH + Duration::from_micros(m));
    Some(Answer {
        available,
        received_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_carry_the_answer_and_when_it_came() {
        let at = UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
        let answer = decode_message(encode_message(true, at).as_bytes()).unwrap();
        assert_eq!(
            answer,
            Answer {
                available: true,
                received_at: Some(at)
            }
        );
        assert!(!decode_message(b"0").unwrap().available);
        assert_eq!(decode_message(b"maybe"), None);
    }

    #[test]
    fn channel_names_give_back_their_key() {
        for key in ["abc", "with:colon", "{braced}", ""] {
            assert_eq!(key_of_channel(&channel(key)), Some(key));
        }
        assert_eq!(key_of_channel("other"), None);
    }
}
