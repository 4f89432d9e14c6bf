DROP INDEX hangup_reasons_time;
DROP INDEX response_log_time;
