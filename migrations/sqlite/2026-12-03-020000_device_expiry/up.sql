-- Devices a SIP proxy registered (RFC 8599) expire with their REGISTER:
-- Unix ms, NULL for devices the app registered, which never expire.
ALTER TABLE devices ADD COLUMN expires_at BIGINT;
