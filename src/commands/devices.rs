//! `call-notifier device list` and `device remove`: the devices of one SIP
//! account, as an operator on call looks at them ("does this phone still
//! have a token?") and clears them (a phone that moved, a stuck token).
//!
//! Both work on a list: an account may come to hold several devices.

use serde_json::json;

use super::text::{rfc3339, short_token, table, utc};
use crate::logs::Escaped;
use crate::store::{Device, Store, StoreError};

/// Why `device remove` did nothing.
#[derive(Debug, thiserror::Error)]
pub enum RemoveError {
    /// No device of the account (with that token) exists: said so the
    /// operator does not take a typo for a removal.
    #[error("no device{} for SIP account {sip_user_id}", if *.with_token { " with that token" } else { "" })]
    NothingMatched { sip_user_id: i64, with_token: bool },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Prints the devices of `sip_user_id`: a table with tokens shortened, or
/// with `json` one object per line with every field and the full token.
/// An account without devices prints a note on stderr (nothing on stdout).
/// Devices whose SIP registration lapsed are listed too (their
/// `expires_at` in the JSON), and left in place: listing changes nothing.
pub async fn list(store: &dyn Store, sip_user_id: i64, json: bool) -> Result<(), StoreError> {
    let devices = store.listed(sip_user_id).await?;
    if devices.is_empty() {
        eprintln!("no device for SIP account {sip_user_id}");
    } else if json {
        for device in &devices {
            println!("{}", as_json(device));
        }
    } else {
        println!("{}", as_table(&devices));
    }
    Ok(())
}

/// Removes the devices of `sip_user_id` (only the one with `token`, when
/// given) and prints a line for each.
pub async fn remove(
    store: &dyn Store,
    sip_user_id: i64,
    token: Option<&str>,
) -> Result<(), RemoveError> {
    let removed = store.remove_devices(sip_user_id, token).await?;
    if removed.is_empty() {
        return Err(RemoveError::NothingMatched {
            sip_user_id,
            with_token: token.is_some(),
        });
    }
    for Device {
        registration: device,
        ..
    } in &removed
    {
        println!(
            "removed {} device {} of app {} from SIP account {sip_user_id}",
            device.platform,
            short_token(&device.token),
            Escaped(&device.app_id)
        );
    }
    Ok(())
}

/// The columns of `device list`.
const COLUMNS: [&str; 10] = [
    "PLATFORM",
    "APP",
    "TOKEN",
    "SANDBOX",
    "REGISTERED",
    "UPDATED",
    "LAST SEEN",
    "NAME",
    "OS",
    "CLIENT",
];

fn as_table(devices: &[Device]) -> String {
    let text = |value: &Option<String>| {
        value
            .as_deref()
            .map_or_else(|| "-".to_owned(), |v| Escaped(v).to_string())
    };
    let rows: Vec<[String; COLUMNS.len()]> = devices
        .iter()
        .map(|row| {
            let d = &row.registration;
            [
                d.platform.to_string(),
                Escaped(&d.app_id).to_string(),
                short_token(&d.token),
                if d.sandbox { "yes" } else { "no" }.to_owned(),
                utc(row.created_at),
                utc(row.updated_at),
                utc(row.last_seen_at),
                text(&d.name),
                text(&d.os_version),
                text(&d.client_version),
            ]
        })
        .collect();
    table(COLUMNS, &rows)
}

/// One device as a JSON object: the registration as the API answers it
/// (the SIP account as text, since JSON numbers lose precision past 2^53;
/// the app as `app`), and its times.
fn as_json(d: &Device) -> serde_json::Value {
    let mut object = json!(d.registration);
    object["registered_at"] = json!(rfc3339(d.created_at));
    object["updated_at"] = json!(rfc3339(d.updated_at));
    object["last_seen_at"] = json!(rfc3339(d.last_seen_at));
    object
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{NewDevice, Platform};

    /// `device list --json` shows an iPhone's `alert_token`, the token its
    /// visible alerts go to, as the registration answer does.
    #[test]
    fn the_json_listing_carries_the_alert_token() {
        let device = Device {
            id: 1,
            registration: NewDevice {
                sip_user_id: 42,
                platform: Platform::Apns,
                token: "a1".into(),
                app_id: "com.example.softphone".into(),
                name: None,
                os_version: None,
                client_version: None,
                remote_logging_id: None,
                sandbox: false,
                alert_token: Some("b2".into()),
                expires_at: None,
                proxy_expires_at: None,
            },
            created_at: 0,
            updated_at: 0,
            last_seen_at: 0,
        };
        let listed = as_json(&device);
        assert_eq!(listed["alert_token"], "b2");
        assert_eq!(listed["sip_user_id"], "42");
        assert_eq!(listed["token"], "a1");
    }
}
