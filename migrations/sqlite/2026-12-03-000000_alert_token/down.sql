ALTER TABLE devices DROP COLUMN alert_token;
