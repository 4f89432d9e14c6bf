#!/usr/bin/env python3
"""The answer script, cold in Redis: two versions of it side by side.

    benches/scripts/answer-script-cold.py A.rs B.rs [ROUNDS] [HOST:PORT]

A.rs and B.rs are two copies of `src/broker/redis/keys.rs` (say
`git show 3fd4fbe:src/broker/redis/keys.rs > /tmp/a.rs`); their
`ANSWER_SCRIPT`s are compared. Each round runs each script once, in random
order, on a fresh ringing record of three devices (and its meta), after 0
to 200 ms idle (Redis runs a script cold after an idle spell, as it does
between a call's set-up and its answer), by `EVALSHA`, with a subscriber
on the call's channel as a server has; a script that takes when the
answer's push was sent (ARGV[9], ARGV[10]) is told the call's own push's. Redis's own log of how long each
command ran (SLOWLOG, every command logged while this runs, then the
settings put back) gives each script's run time; printed: runs, p50 and
p25-p75 in microseconds. Two copies of one script (one with a comment
added) show how far two runs differ by noise alone.

Only for a Redis of your own: it writes `cn:{bench-cold}` and changes the
SLOWLOG settings while it runs. No Python package needed.
"""
import random
import re
import socket
import statistics
import sys
import threading
import time


def script(path):
    text = open(path).read()
    return re.search(r'ANSWER_SCRIPT: &str = r#"(.*?)"#;', text, re.S).group(1)


def encode(*args):
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        arg = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


class Connection:
    def __init__(self, host, port):
        self.sock = socket.create_connection((host, port))
        self.file = self.sock.makefile("rb")

    def command(self, *args):
        self.sock.sendall(encode(*args))
        return self.read()

    def read(self):
        line = self.file.readline()
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self.file.read(n + 2)[:-2].decode(errors="replace")
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self.read() for _ in range(n)]
        raise RuntimeError(f"unexpected reply {line!r}")


def main():
    paths = sys.argv[1:3]
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 300
    host, port = (sys.argv[4] if len(sys.argv) > 4 else "127.0.0.1:6379").rsplit(":", 1)
    redis = Connection(host, int(port))
    scripts = {path: script(path) for path in paths}
    if len(set(scripts.values())) < 2:
        sys.exit("the two scripts are the same text: add a comment to one")
    sha = {path: redis.command("SCRIPT", "LOAD", text) for path, text in scripts.items()}
    key, meta, channel = "cn:{bench-cold}", "cn:{bench-cold}:meta", "cn:{bench-cold}:answer"
    subscriber = Connection(host, int(port))
    subscriber.command("SUBSCRIBE", channel)
    threading.Thread(target=lambda: [subscriber.read() for _ in iter(int, 1)], daemon=True).start()
    before = {
        name: redis.command("CONFIG", "GET", name)[1]
        for name in ["slowlog-max-len", "slowlog-log-slower-than"]
    }
    redis.command("CONFIG", "SET", "slowlog-max-len", "200000")
    redis.command("CONFIG", "SET", "slowlog-log-slower-than", "0")
    redis.command("SLOWLOG", "RESET")
    try:
        for _ in range(rounds):
            for path in random.sample(paths, 2):
                opened = int(time.time() * 1000)
                until = opened + 60_000
                redis.command("SET", key, f"ring {until} android android apns", "PX", 120_000)
                redis.command("SET", meta, f"1 42 {until} {opened}", "PX", 120_000)
                time.sleep(random.uniform(0, 0.2))
                now = int(time.time() * 1000)
                args = ["2", "+", channel, "2 1 1700000000000000", "PUBLISH", "0", "0", now]
                if "ARGV[10]" in scripts[path]:
                    # An answer to the call's own push, sent as it opened
                    # (plus the margin, and that plus a 60 s wait).
                    args += [opened + 1, opened + 1 + 60_000]
                keys = [key, meta] if "KEYS[2]" in scripts[path] else [key]
                reply = redis.command("EVALSHA", sha[path], len(keys), *keys, *args)
                assert reply.startswith("1"), (path, reply)
        log = redis.command("SLOWLOG", "GET", "-1")
    finally:
        for name, value in before.items():
            redis.command("CONFIG", "SET", name, value)
        redis.command("SLOWLOG", "RESET")
    for path in paths:
        runs = sorted(
            entry[2]
            for entry in log
            if entry[3] and entry[3][0].upper() == "EVALSHA" and entry[3][1] == sha[path]
        )
        q = statistics.quantiles(runs, n=4)
        print(f"{path}: runs {len(runs)}, p50 {statistics.median(runs):.0f} µs, "
              f"p25-p75 {q[0]:.0f}-{q[2]:.0f} µs")


if __name__ == "__main__":
    main()
