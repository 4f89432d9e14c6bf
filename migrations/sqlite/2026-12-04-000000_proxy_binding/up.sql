-- How long a SIP proxy's binding of a device lives (RFC 8599), Unix ms,
-- apart from the device's own expiry: a device its app registered never
-- expires, yet its proxy's REGISTER still answers its calls while bound.
-- Added, never required: a release that does not know it leaves it NULL.
ALTER TABLE devices ADD COLUMN proxy_expires_at BIGINT;
UPDATE devices SET proxy_expires_at = expires_at WHERE expires_at IS NOT NULL;
