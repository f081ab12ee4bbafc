#!/usr/bin/env python3
"""Records real PostgreSQL traffic as fuzz seeds: fuzz/seeds/<target>/<name>.

Starts a throwaway PostgreSQL 15 (initdb into a temp dir, SCRAM passwords, 127.0.0.1 only,
as the `postgres` OS user when run as root), puts a recording TCP proxy in front of it,
runs psql and pgbench (simple, extended and prepared protocol) through the proxy, and
turns each connection's bytes into seeds in the input format of each target:

  framing      the server's byte stream (choice bytes first)
  startup      the client's startup packet
  auth         the server's authentication messages (iampool as the client: the client
               nonce replaced by @@, which the target splices back) and the client's
               (iampool as the server)
  scan         both directions after the startup phase, cut to the target's layout
  admin        console commands; config: a URL, an auth file, a TOML file (hand-written)

relay_model takes choices rather than a byte stream, so it starts from an empty corpus.
Run: python3 fuzz/capture.py [--out DIR]   (needs PostgreSQL 15 from scripts/setup.sh).
"""

import argparse
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

PG_BIN = "/usr/lib/postgresql/15/bin"
PASSWORD = "capture-pw"


def free_port(start):
    """A free 127.0.0.1 port at or above `start`, below 32768."""
    for port in range(start, 32768):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise SystemExit("no free port below 32768")


def as_postgres(cmd):
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--"] + cmd
    return cmd


class Recorder:
    """A TCP proxy that keeps every connection's bytes, per direction."""

    def __init__(self, listen_port, upstream_port):
        self.upstream_port = upstream_port
        self.conns = []
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", listen_port))
        self.sock.listen(64)
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream_port))
            record = {"client": bytearray(), "server": bytearray(), "done": 0}
            with self.lock:
                self.conns.append(record)
            for src, dst, key in ((client, server, "client"), (server, client, "server")):
                threading.Thread(target=self.pump, args=(src, dst, record, key), daemon=True).start()

    def pump(self, src, dst, record, key):
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            record[key] += data
            try:
                dst.sendall(data)
            except OSError:
                break
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        with self.lock:
            record["done"] += 1

    def take(self):
        """The connections recorded since the last call, once both directions closed."""
        deadline = time.time() + 10
        while time.time() < deadline:
            with self.lock:
                if all(r["done"] == 2 for r in self.conns):
                    break
            time.sleep(0.05)
        with self.lock:
            conns, self.conns = self.conns, []
        return [(bytes(r["client"]), bytes(r["server"])) for r in conns]


def frames(data):
    """Regular messages (tag, length, body) from the front of `data`."""
    out, pos = [], 0
    while len(data) - pos >= 5:
        (length,) = struct.unpack("!i", data[pos + 1 : pos + 5])
        if length < 4 or len(data) - pos < length + 1:
            break
        out.append(data[pos : pos + length + 1])
        pos += length + 1
    return out, pos


def split_client(data):
    """The client's stream: (startup packet, messages after it), skipping an SSLRequest."""
    pos = 0
    while len(data) - pos >= 8:
        length, code = struct.unpack("!ii", data[pos : pos + 8])
        if code in (80877103, 80877104):  # SSLRequest, GSSENCRequest
            pos += length
            continue
        return data[pos : pos + length], data[pos + length :]
    return b"", b""


def split_server(data):
    """The server's stream: (authentication messages, the rest after the first ReadyForQuery)."""
    if data[:1] in (b"N", b"S"):
        data = data[1:]
    msgs, _ = frames(data)
    auth, rest_at, pos = [], None, 0
    for m in msgs:
        pos += len(m)
        if m[:1] == b"R":
            auth.append(m)
        if m[:1] == b"Z":
            rest_at = pos
            break
    return auth, data[rest_at:] if rest_at is not None else b""


def client_auth_messages(data):
    """The client's password messages ('p') after the startup packet."""
    _, rest = split_client(data)
    msgs, _ = frames(rest)
    return [m for m in msgs if m[:1] == b"p"]


def write(out, target, name, data):
    d = os.path.join(out, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def scan_seed(client, server):
    """The scan target's layout: mode, max, order, read sizes, cut, client bytes, server bytes."""
    client = client[:255]
    head = bytes([1, 255]) + bytes([0, 1, 1, 0, 0, 1, 0, 1]) + bytes([7, 3, 200, 1]) + bytes([5, 64, 2, 250])
    return head + bytes([len(client)]) + client + server


def run(cmd, env, check=True):
    subprocess.run(cmd, env=env, check=check, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds"))
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="iampool-capture-")
    os.chmod(tmp, 0o755)
    data = os.path.join(tmp, "data")
    pwfile = os.path.join(tmp, "pw")
    with open(pwfile, "w") as f:
        f.write(PASSWORD + "\n")
    if os.geteuid() == 0:
        shutil.chown(tmp, "postgres")
        shutil.chown(pwfile, "postgres")
    pg_port = free_port(25400)
    proxy_port = free_port(pg_port + 1)
    server = None
    try:
        run(as_postgres([f"{PG_BIN}/initdb", "-D", data, "-U", "postgres", "--pwfile", pwfile,
                         "--auth=scram-sha-256", "--no-sync"]), os.environ)
        server = subprocess.Popen(as_postgres([
            f"{PG_BIN}/postgres", "-D", data, "-p", str(pg_port), "-k", tmp,
            "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        env = dict(os.environ, PGHOST="127.0.0.1", PGPORT=str(pg_port), PGUSER="postgres",
                   PGPASSWORD=PASSWORD, PGDATABASE="postgres", PGSSLMODE="prefer")
        for _ in range(100):
            if subprocess.run(["pg_isready", "-q"], env=env).returncode == 0:
                break
            time.sleep(0.1)
        run(["pgbench", "-i", "-s", "1", "-q"], env)

        rec = Recorder(proxy_port, pg_port)
        env["PGPORT"] = str(proxy_port)
        sessions = {
            "psql_simple": ["psql", "-X", "-c", "select 1", "-c", "select * from pgbench_branches"],
            "psql_errors": ["psql", "-X", "-c", "begin; select 1/0; rollback",
                            "-c", "copy pgbench_branches to stdout",
                            "-c", "set search_path = public", "-c", "listen x"],
            "pgbench_simple": ["pgbench", "-n", "-t", "3", "-M", "simple"],
            "pgbench_extended": ["pgbench", "-n", "-t", "3", "-M", "extended"],
            "pgbench_prepared": ["pgbench", "-n", "-t", "3", "-M", "prepared"],
        }
        for name, cmd in sessions.items():
            # psql_errors fails on purpose (psql exits 1 after an error).
            run(cmd, env, check=name != "psql_errors")
            for i, (client, srv) in enumerate(rec.take()):
                tag = f"{name}-{i}"
                startup, after_startup = split_client(client)
                auth, after_auth = split_server(srv)
                if startup:
                    write(args.out, "startup", tag, startup)
                write(args.out, "framing", tag, bytes([0xff, 0xff]) + bytes(8) + srv[1:])
                # iampool as the client: the server's messages; its nonce is spliced in.
                nonce = None
                for m in client_auth_messages(client):
                    if b"r=" in m:
                        nonce = m[m.index(b"r=") + 2 :].split(b",")[0]
                        break
                server_side = b"".join(auth)
                if nonce:
                    server_side = b"".join(
                        m[:1] + struct.pack("!i", len(m) - 1 - len(nonce) + 2) + m[5:].replace(nonce, b"@@")
                        if nonce in m else m
                        for m in auth)
                write(args.out, "auth", tag + "-server", bytes([0x05]) + server_side)
                write(args.out, "auth", tag + "-client", bytes([0x48]) + b"".join(client_auth_messages(client)))
                msgs, _ = frames(after_startup)
                after_login = b"".join(m for m in msgs if m[:1] != b"p")
                write(args.out, "scan", tag, scan_seed(after_login, after_auth))
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)

    # Hand-written seeds for the text parsers.
    write(args.out, "admin", "commands", b'SHOW POOLS; show stats;PAUSE "my db";RESUME app; RECONNECT;\n'
          b"-- a comment\nRELOAD; SHOW HELP; SHUTDOWN")
    write(args.out, "admin", "pgbouncer125", b'SHOW STATS_TOTALS;SHOW clients; KILL_CLIENT 42; KILL "my db";'
          b" WAIT_CLOSE; DISABLE app; ENABLE app; SUSPEND; SET x = 1; SHUTDOWN WAIT_FOR_SERVERS")
    write(args.out, "config", "url", b"\x00postgres://app:s3cret%2F@db.cluster-abc.us-east-1.rds.amazonaws.com:5432/app?sslmode=require")
    write(args.out, "config", "auth_file", b'\x01"alice" "md5a1ffb4b0a4cdb8dd6bd8e9b7bbd12ae0"\n; comment\n"bob" "plain ""quoted"""\n'
          b'"carol" "SCRAM-SHA-256$4096:c2FsdA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="\n')
    write(args.out, "config", "toml", b'\x02listen = ["127.0.0.1:6432"]\npool_mode = "transaction"\n'
          b'auth_type = "scram-sha-256"\n[databases.app]\nupstream = "postgres://app:pw@127.0.0.1:5432/app"\n'
          b'pool_size = 5\n[users.alice]\npassword = "a-long-enough-secret"\n')
    print(f"seeds written under {args.out}")


if __name__ == "__main__":
    sys.exit(main())
