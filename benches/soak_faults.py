#!/usr/bin/env python3
"""Client-side faults for benches/soak.sh, speaking the PostgreSQL protocol by hand.

    soak_faults.py stall --port P --user U --password PW --db D --seconds S
        Logs in (md5 or trust), sends a query with a multi-gigabyte result and reads
        nothing for S seconds, then closes: the pooler must apply back-pressure, not buffer.
    soak_faults.py slowloris --port P --count N --seconds S
        N sockets that send a startup packet one byte per second, for at most S seconds:
        the pooler drops them at client_login_timeout.

Prints one line saying what happened. stdlib only.
"""

import argparse
import hashlib
import socket
import struct
import sys
import time


def startup(user, db):
    body = struct.pack("!i", 196608)
    for k, v in (("user", user), ("database", db)):
        body += k.encode() + b"\0" + v.encode() + b"\0"
    body += b"\0"
    return struct.pack("!i", len(body) + 4) + body


def read_message(s):
    head = b""
    while len(head) < 5:
        chunk = s.recv(5 - len(head))
        if not chunk:
            raise EOFError("closed")
        head += chunk
    tag, length = head[:1], struct.unpack("!i", head[1:5])[0]
    body = b""
    while len(body) < length - 4:
        chunk = s.recv(length - 4 - len(body))
        if not chunk:
            raise EOFError("closed")
        body += chunk
    return tag, body


def login(port, user, password, db):
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(startup(user, db))
    while True:
        tag, body = read_message(s)
        if tag == b"R":
            kind = struct.unpack("!i", body[:4])[0]
            if kind == 5:
                salt = body[4:8]
                inner = hashlib.md5((password + user).encode()).hexdigest()
                outer = "md5" + hashlib.md5(inner.encode() + salt).hexdigest()
                msg = outer.encode() + b"\0"
                s.sendall(b"p" + struct.pack("!i", len(msg) + 4) + msg)
            elif kind != 0:
                raise RuntimeError("authentication method %d not supported here" % kind)
        elif tag == b"E":
            raise RuntimeError("login refused: %r" % body)
        elif tag == b"Z":
            return s


def stall(a):
    s = login(a.port, a.user, a.password, a.db)
    sql = b"select repeat('x', 8000) from generate_series(1, 1000000)\0"
    s.sendall(b"Q" + struct.pack("!i", len(sql) + 4) + sql)
    time.sleep(a.seconds)
    s.close()
    print("stall: a client read nothing for %ds after asking for 8 GB" % a.seconds)


def slowloris(a):
    packet = startup("slowloris", "slowloris")
    socks = []
    for _ in range(a.count):
        try:
            socks.append(socket.create_connection(("127.0.0.1", a.port), timeout=5))
        except OSError:
            break
    opened = len(socks)
    closed_by_pooler = 0
    start = time.time()
    i = 0
    while socks and time.time() - start < a.seconds and i < len(packet):
        alive = []
        for s in socks:
            try:
                s.sendall(packet[i:i + 1])
                alive.append(s)
            except OSError:
                closed_by_pooler += 1
                s.close()
        socks = alive
        i += 1
        time.sleep(1)
    for s in socks:
        s.close()
    print("slowloris: %d sockets opened, %d closed by the pooler within %ds"
          % (opened, closed_by_pooler, int(time.time() - start)))


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("stall")
    sl = sub.add_parser("slowloris")
    for p in (st, sl):
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--seconds", type=int, default=20)
    st.add_argument("--user", required=True)
    st.add_argument("--password", required=True)
    st.add_argument("--db", required=True)
    sl.add_argument("--count", type=int, default=50)
    a = ap.parse_args(argv)
    try:
        stall(a) if a.cmd == "stall" else slowloris(a)
    except Exception as e:  # reported, not fatal to the soak
        print("%s: failed: %s" % (a.cmd, e))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
