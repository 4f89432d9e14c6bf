-- Back to one device per account: each keeps the device registered or
-- updated last (ties: the highest id), the others are dropped.
CREATE TABLE devices_old (
    sip_user_id BIGINT PRIMARY KEY NOT NULL,
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
INSERT INTO devices_old (sip_user_id, platform, token, app_id, name, os_version,
                         client_version, remote_logging_id, sandbox, created_at,
                         updated_at, last_seen_at, alert_token)
    SELECT sip_user_id, platform, token, app_id, name, os_version,
           client_version, remote_logging_id, sandbox, created_at,
           updated_at, last_seen_at, alert_token
    FROM devices AS older
    WHERE NOT EXISTS (
        SELECT 1 FROM devices AS newer
        WHERE newer.sip_user_id = older.sip_user_id
          AND (newer.updated_at > older.updated_at
               OR (newer.updated_at = older.updated_at AND newer.id > older.id))
    );
DROP TABLE devices;
ALTER TABLE devices_old RENAME TO devices;
