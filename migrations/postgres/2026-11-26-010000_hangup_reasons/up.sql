-- Why a call ended on the phone, as the app reports it after the fact.
CREATE TABLE hangup_reasons (
    id BIGSERIAL PRIMARY KEY,
    sip_user_id BIGINT NOT NULL,
    unique_key TEXT NOT NULL,
    reason TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX hangup_reasons_unique_key ON hangup_reasons (unique_key);
