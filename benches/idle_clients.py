#!/usr/bin/env python3
"""Open N PostgreSQL client connections, log each in, run SELECT 1 on each, hold them idle.

    idle_clients.py --host 127.0.0.1 --port 6432 --user bench --database bench -n 10000

Password from PGPASSWORD (cleartext, md5 and SCRAM-SHA-256 are answered). Python stdlib only,
plaintext protocol 3.0. Prints one line `HOLDING connected=N failed=M seconds=S` once every
connection has either finished its SELECT 1 or failed, then keeps them open until SIGUSR1,
SIGTERM, SIGINT or --hold seconds; then sends Terminate on each, closes them and prints
`CLOSED`. Exit status 0 when all N connected, 1 otherwise. Used by benches/compare.sh for the
idle-client memory test.
"""

import argparse
import asyncio
import base64
import hashlib
import hmac
import os
import resource
import signal
import struct
import sys
import time


class PgError(Exception):
    pass


def _msg(tag: bytes, body: bytes) -> bytes:
    return tag + struct.pack("!I", len(body) + 4) + body


async def _read(reader: asyncio.StreamReader):
    head = await reader.readexactly(5)
    tag = head[:1]
    (length,) = struct.unpack("!I", head[1:])
    body = await reader.readexactly(length - 4) if length > 4 else b""
    return tag, body


def _error_text(body: bytes) -> str:
    fields = {}
    for part in body.split(b"\0"):
        if part:
            fields[part[:1]] = part[1:].decode("utf-8", "replace")
    return f"{fields.get(b'S', 'ERROR')} {fields.get(b'C', '')}: {fields.get(b'M', '')}"


def _scram_client_final(password: str, client_nonce: str, server_first: str):
    attrs = dict(item.split("=", 1) for item in server_first.split(","))
    nonce, salt, iterations = attrs["r"], base64.b64decode(attrs["s"]), int(attrs["i"])
    if not nonce.startswith(client_nonce):
        raise PgError("SCRAM: server nonce does not extend ours")
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    without_proof = f"c=biws,r={nonce}"
    auth_message = f"n=,r={client_nonce},{server_first},{without_proof}".encode()
    signature = hmac.new(stored_key, auth_message, hashlib.sha256).digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature))
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    server_sig = hmac.new(server_key, auth_message, hashlib.sha256).digest()
    final = f"{without_proof},p={base64.b64encode(proof).decode()}"
    return final, base64.b64encode(server_sig).decode()


async def login(host, port, user, database, password):
    reader, writer = await asyncio.open_connection(host, port)
    try:
        params = b"user\0" + user.encode() + b"\0database\0" + database.encode() + b"\0\0"
        body = struct.pack("!I", 196608) + params
        writer.write(struct.pack("!I", len(body) + 4) + body)
        await writer.drain()
        expected_sig = None
        client_nonce = None
        while True:
            tag, body = await _read(reader)
            if tag == b"R":
                (code,) = struct.unpack("!I", body[:4])
                if code == 0:
                    continue
                if code == 3:
                    writer.write(_msg(b"p", password.encode() + b"\0"))
                elif code == 5:
                    inner = hashlib.md5(password.encode() + user.encode()).hexdigest()
                    outer = hashlib.md5(inner.encode() + body[4:8]).hexdigest()
                    writer.write(_msg(b"p", b"md5" + outer.encode() + b"\0"))
                elif code == 10:
                    mechs = body[4:].split(b"\0")
                    if b"SCRAM-SHA-256" not in mechs:
                        raise PgError(f"no supported SASL mechanism in {mechs!r}")
                    client_nonce = base64.b64encode(os.urandom(18)).decode()
                    first = f"n,,n=,r={client_nonce}".encode()
                    payload = b"SCRAM-SHA-256\0" + struct.pack("!I", len(first)) + first
                    writer.write(_msg(b"p", payload))
                elif code == 11:
                    final, expected_sig = _scram_client_final(
                        password, client_nonce, body[4:].decode()
                    )
                    writer.write(_msg(b"p", final.encode()))
                elif code == 12:
                    got = dict(i.split("=", 1) for i in body[4:].decode().split(","))
                    if got.get("v") != expected_sig:
                        raise PgError("SCRAM: wrong server signature")
                    continue
                else:
                    raise PgError(f"unsupported authentication request {code}")
                await writer.drain()
            elif tag == b"E":
                raise PgError(_error_text(body))
            elif tag == b"Z":
                break
        writer.write(_msg(b"Q", b"SELECT 1\0"))
        await writer.drain()
        while True:
            tag, body = await _read(reader)
            if tag == b"E":
                raise PgError(_error_text(body))
            if tag == b"Z":
                break
        return reader, writer
    except BaseException:
        writer.close()
        raise


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--user", default="bench")
    ap.add_argument("--database", default="bench")
    ap.add_argument("-n", "--clients", type=int, default=10000)
    ap.add_argument("--concurrency", type=int, default=200, help="logins in flight at once")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per login")
    ap.add_argument("--hold", type=float, default=600.0, help="most seconds to hold them")
    args = ap.parse_args()
    password = os.environ.get("PGPASSWORD", "")

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.clients + 100
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
        if hard < want:
            print(f"idle_clients: open files limited to {hard}", file=sys.stderr)

    sem = asyncio.Semaphore(args.concurrency)
    errors = {}

    async def one():
        async with sem:
            try:
                return await asyncio.wait_for(
                    login(args.host, args.port, args.user, args.database, password),
                    args.timeout,
                )
            except (OSError, PgError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
                key = f"{type(e).__name__}: {e}"[:200]
                errors[key] = errors.get(key, 0) + 1
                return None

    started = time.monotonic()
    results = await asyncio.gather(*(one() for _ in range(args.clients)))
    conns = [c for c in results if c is not None]
    elapsed = time.monotonic() - started
    for err, count in sorted(errors.items(), key=lambda kv: -kv[1])[:5]:
        print(f"idle_clients: {count} x {err}", file=sys.stderr)
    print(
        f"HOLDING connected={len(conns)} failed={args.clients - len(conns)} seconds={elapsed:.1f}",
        flush=True,
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await asyncio.wait_for(stop.wait(), args.hold)
    except asyncio.TimeoutError:
        pass
    for _, writer in conns:
        try:
            writer.write(_msg(b"X", b""))
            writer.close()
        except OSError:
            pass
    await asyncio.gather(*(w.wait_closed() for _, w in conns), return_exceptions=True)
    print("CLOSED", flush=True)
    return 0 if len(conns) == args.clients else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
