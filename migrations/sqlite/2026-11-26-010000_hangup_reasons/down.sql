DROP TABLE hangup_reasons;
