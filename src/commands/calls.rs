//! `call-notifier calls`: the call history of one SIP account, as an
//! operator on call reads it when a user says "my phone did not ring":
//! which devices each call pushed, how often, what the push service said,
//! how the call ended and which phone took it.

use serde_json::json;

use super::text::{rfc3339, table, utc};
use crate::config::CallsQuery;
use crate::logs::Escaped;
use crate::store::{CallHistoryEntry, CalledDevice, Store, StoreError};

/// Prints the calls `query` asks for, newest first: a table, or with
/// `--json` one object per line with every field. An account without calls
/// (in that range) prints a note on stderr and nothing on stdout.
pub async fn list(store: &dyn Store, query: &CallsQuery) -> Result<(), StoreError> {
    let calls = store
        .calls(query.sip_user_id, query.since, query.last)
        .await?;
    if calls.is_empty() {
        eprintln!("no call for SIP account {}", query.sip_user_id);
    } else if query.json {
        for call in &calls {
            println!("{}", as_json(call));
        }
    } else {
        println!("{}", as_table(&calls));
    }
    Ok(())
}

/// The columns of `calls`.
const COLUMNS: [&str; 6] = ["TIME", "KEY", "OUTCOME", "WAITED", "DEVICES", "ANSWERED"];

fn as_table(calls: &[CallHistoryEntry]) -> String {
    let rows: Vec<[String; COLUMNS.len()]> = calls
        .iter()
        .map(|call| {
            let devices: Vec<String> = call.devices.iter().map(device_cell).collect();
            [
                utc(call.created_at),
                or_dash(Escaped(&call.unique_key).to_string()),
                Escaped(&call.outcome).to_string(),
                format!("{} ms", call.waited_ms),
                or_dash(devices.join(", ")),
                answered_cell(call),
            ]
        })
        .collect();
    table(COLUMNS, &rows)
}

/// One device of a call: `android:eJx9k3Qw…C0hQ x2 delivered` (the token as
/// stored, already shortened and escaped).
fn device_cell(device: &CalledDevice) -> String {
    format!(
        "{}:{} x{} {}",
        device.platform,
        device.token,
        device.attempts,
        device
            .verdict
            .as_deref()
            .map_or("-".into(), |v| Escaped(v).to_string())
    )
}

/// Which device took the call (its index in DEVICES, from 0) and its
/// wake-up: `#0 412 ms`; `-` when none did.
fn answered_cell(call: &CallHistoryEntry) -> String {
    match (call.answered_by, call.roundtrip_ms) {
        (Some(index), Some(roundtrip)) => format!("#{index} {roundtrip} ms"),
        (Some(index), None) => format!("#{index}"),
        (None, _) => "-".into(),
    }
}

fn or_dash(cell: String) -> String {
    if cell.is_empty() {
        "-".into()
    } else {
        cell
    }
}

/// One call as a JSON object: every field, the time both as RFC 3339 and
/// as Unix ms, the SIP account as text (JSON numbers lose precision past
/// 2^53, as in `device list`).
fn as_json(call: &CallHistoryEntry) -> serde_json::Value {
    json!({
        "time": rfc3339(call.created_at),
        "created_at": call.created_at,
        "sip_user_id": call.sip_user_id.to_string(),
        "unique_key": call.unique_key,
        "outcome": call.outcome,
        "waited_ms": call.waited_ms,
        "devices": call.devices,
        "answered_by": call.answered_by,
        "roundtrip_ms": call.roundtrip_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Platform;

    fn call() -> CallHistoryEntry {
        CallHistoryEntry {
            created_at: 1_700_000_000_123,
            sip_user_id: 42,
            unique_key: "c-1".into(),
            devices: vec![
                CalledDevice {
                    platform: Platform::Android,
                    token: "eJx9k3Qw…C0hQ".into(),
                    attempts: 2,
                    verdict: Some("delivered".into()),
                },
                CalledDevice {
                    platform: Platform::Apns,
                    token: "5f2c8e1a…90ab".into(),
                    attempts: 0,
                    verdict: Some("token_dead Unregistered".into()),
                },
            ],
            outcome: "ack".into(),
            waited_ms: 1830,
            answered_by: Some(0),
            roundtrip_ms: Some(1712),
        }
    }

    #[test]
    fn a_call_is_one_table_row() {
        let mut unanswered = call();
        unanswered.unique_key = String::new();
        unanswered.devices.clear();
        unanswered.outcome = "no_device".into();
        unanswered.answered_by = None;
        unanswered.roundtrip_ms = None;
        assert_eq!(
            as_table(&[call(), unanswered]),
            "TIME                     KEY  OUTCOME    WAITED   DEVICES                                                                            ANSWERED\n\
             2023-11-14 22:13:20 UTC  c-1  ack        1830 ms  android:eJx9k3Qw…C0hQ x2 delivered, apns:5f2c8e1a…90ab x0 token_dead Unregistered  #0 1712 ms\n\
             2023-11-14 22:13:20 UTC  -    no_device  1830 ms  -                                                                                  -"
        );
    }

    #[test]
    fn a_call_is_one_json_object_with_every_field() {
        let object = as_json(&call());
        assert_eq!(object["time"], "2023-11-14T22:13:20.123Z");
        assert_eq!(object["sip_user_id"], "42");
        assert_eq!(object["devices"][1]["verdict"], "token_dead Unregistered");
        assert_eq!(object["devices"][0]["attempts"], 2);
        assert_eq!(object["answered_by"], 0);
        assert_eq!(object["roundtrip_ms"], 1712);
    }
}
