DROP TABLE response_log;
DROP TABLE devices;
DROP TABLE apps;
