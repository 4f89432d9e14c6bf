ALTER TABLE devices DROP COLUMN proxy_expires_at;
