-- Several devices per SIP account (--max-devices-per-account): a surrogate
-- key instead of the account, and one row per (account, platform, app,
-- token). The unique index leads with sip_user_id, so it also serves the
-- lookups of an account's devices. SQLite cannot change a primary key in
-- place: the table is rebuilt, and every row copied, oldest first.
CREATE TABLE devices_new (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sip_user_id BIGINT NOT NULL,
    platform TEXT NOT NULL,
    token TEXT NOT NULL,
    app_id TEXT NOT NULL,
    name TEXT,
    os_version TEXT,
    client_version TEXT,
    remote_logging_id TEXT,
    sandbox BOOLEAN NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    last_seen_at BIGINT NOT NULL,
    alert_token TEXT
);
INSERT INTO devices_new (sip_user_id, platform, token, app_id, name, os_version,
                         client_version, remote_logging_id, sandbox, created_at,
                         updated_at, last_seen_at, alert_token)
    SELECT sip_user_id, platform, token, app_id, name, os_version,
           client_version, remote_logging_id, sandbox, created_at,
           updated_at, last_seen_at, alert_token
    FROM devices
    ORDER BY created_at, sip_user_id;
DROP TABLE devices;
ALTER TABLE devices_new RENAME TO devices;
CREATE UNIQUE INDEX devices_account_device ON devices (sip_user_id, platform, app_id, token);
