-- Push apps: one row per (platform, app id). Credentials are a JSON document
-- of file paths and environment-variable names, never the secrets themselves.
CREATE TABLE apps (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    platform TEXT NOT NULL,
    app_id TEXT NOT NULL,
    credentials TEXT,
    created_at BIGINT NOT NULL,
    UNIQUE (platform, app_id)
);

-- One device per SIP account: the primary key makes a second impossible.
CREATE TABLE devices (
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
    last_seen_at BIGINT NOT NULL
);

-- What the apps reported: how long a push took to wake them.
CREATE TABLE response_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    platform TEXT NOT NULL,
    roundtrip DOUBLE NOT NULL,
    available BOOLEAN NOT NULL,
    created_at BIGINT NOT NULL
);
