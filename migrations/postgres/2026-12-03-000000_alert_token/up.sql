-- iOS only: the app's regular APNs device token, for visible alerts (a call
-- that ended, a takeover); never used to wake the app for a call.
ALTER TABLE devices ADD COLUMN alert_token TEXT;
