-- The response log and the hangup reasons are deleted after
-- --call-history-days, as the call history is: the purge deletes by
-- created_at alone.
CREATE INDEX response_log_time ON response_log (created_at);
CREATE INDEX hangup_reasons_time ON hangup_reasons (created_at);
