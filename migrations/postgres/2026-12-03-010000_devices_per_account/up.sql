-- Several devices per SIP account (--max-devices-per-account): a surrogate
-- key instead of the account, and one row per (account, platform, app,
-- token). The unique index leads with sip_user_id, so it also serves the
-- lookups of an account's devices. Existing rows keep their data and get an
-- id each.
ALTER TABLE devices DROP CONSTRAINT devices_pkey;
ALTER TABLE devices ADD COLUMN id BIGSERIAL PRIMARY KEY;
CREATE UNIQUE INDEX devices_account_device ON devices (sip_user_id, platform, app_id, token);
