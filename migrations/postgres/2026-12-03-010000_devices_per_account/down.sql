-- Back to one device per account: each keeps the device registered or
-- updated last (ties: the highest id), the others are deleted.
DELETE FROM devices AS older
    USING devices AS newer
    WHERE newer.sip_user_id = older.sip_user_id
      AND (newer.updated_at, newer.id) > (older.updated_at, older.id);
DROP INDEX devices_account_device;
ALTER TABLE devices DROP COLUMN id;
ALTER TABLE devices ADD PRIMARY KEY (sip_user_id);
