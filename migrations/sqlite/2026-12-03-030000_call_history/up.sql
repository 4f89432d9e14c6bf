-- One row per incoming call, written in batches off the call path and
-- deleted after --call-history-days by a periodic task. `devices` is JSON
-- text (a list of {platform, token (shortened), attempts, verdict}), so both
-- backends share one column type. Reads name an account and go newest first
-- (sip_user_id, created_at); the purge deletes by created_at alone.
CREATE TABLE call_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at BIGINT NOT NULL,
    sip_user_id BIGINT NOT NULL,
    unique_key TEXT NOT NULL,
    devices TEXT NOT NULL,
    outcome TEXT NOT NULL,
    waited_ms BIGINT NOT NULL,
    answered_by INTEGER,
    roundtrip_ms BIGINT
);
CREATE INDEX call_history_account_time ON call_history (sip_user_id, created_at);
CREATE INDEX call_history_time ON call_history (created_at);
