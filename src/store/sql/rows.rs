//! The rows of the tables whose stored form differs from the model's (an
//! app's credentials and a call's devices as JSON text, platforms as names),
//! and their conversions.

use super::*;

pub(super) fn parse_platform(name: &str) -> Result<Platform, StoreError> {
    Platform::parse(name).ok_or_else(|| StoreError::Corrupt(format!("unknown platform {name:?}")))
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = apps)]
pub(super) struct AppRow {
    platform: String,
    app_id: String,
    credentials: Option<String>,
}

impl AppRow {
    pub(super) fn into_app(self) -> Result<App, StoreError> {
        let credentials = match self.credentials {
            None => None,
            Some(json) => Some(serde_json::from_str(&json).map_err(|e| {
                StoreError::Corrupt(format!("credentials of app {}: {e}", self.app_id))
            })?),
        };
        Ok(App {
            platform: parse_platform(&self.platform)?,
            app_id: self.app_id,
            credentials,
        })
    }
}

pub(super) fn credentials_json(app: &App) -> Option<String> {
    app.credentials
        .as_ref()
        .map(|c| serde_json::to_string(c).expect("credentials serialize to JSON"))
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = call_history)]
pub(super) struct CallRow {
    created_at: i64,
    sip_user_id: i64,
    unique_key: String,
    devices: String,
    outcome: String,
    waited_ms: i64,
    answered_by: Option<i32>,
    roundtrip_ms: Option<i64>,
}

impl CallRow {
    pub(super) fn into_entry(self) -> Result<CallHistoryEntry, StoreError> {
        let devices = serde_json::from_str(&self.devices).map_err(|e| {
            StoreError::Corrupt(format!("devices of the call {:?}: {e}", self.unique_key))
        })?;
        Ok(CallHistoryEntry {
            created_at: self.created_at,
            sip_user_id: self.sip_user_id,
            unique_key: self.unique_key,
            devices,
            outcome: self.outcome,
            waited_ms: self.waited_ms,
            answered_by: self.answered_by,
            roundtrip_ms: self.roundtrip_ms,
        })
    }
}

pub(super) fn devices_json(devices: &[CalledDevice]) -> String {
    serde_json::to_string(devices).expect("called devices serialize to JSON")
}
