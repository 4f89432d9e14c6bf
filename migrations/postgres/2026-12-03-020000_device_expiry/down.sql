ALTER TABLE devices DROP COLUMN expires_at;
