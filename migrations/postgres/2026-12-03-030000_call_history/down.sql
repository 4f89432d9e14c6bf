DROP TABLE call_history;
