#!/usr/bin/env python3
"""Verify an RDS IAM token the way RDS would, for the test PostgreSQL's PAM stack.

Run by pam_exec.so with expose_authtok: the token arrives on stdin (NUL- or
newline-terminated), the database user in PAM_USER. Written independently of iampool's
Rust signer: the SigV4 math below is done here from the specification, stdlib only.

    rds_iam_verifier.py --keys KEYS.json --region R --host H --port P [--log FILE] [--now T]
                        [--skew-seconds S]
    rds_iam_verifier.py --self-test [--vectors rds-iam-tokens.json]

KEYS.json maps access key id -> {"secret": "...", "expires": "ISO 8601" (optional)}; a key
past its "expires" models a token signed by credentials that have since expired.
Exit status 0 = valid, 1 = rejected. One reason line per attempt goes to --log; the token
itself is never written anywhere.
"""

import argparse
import datetime as dt
import hashlib
import hmac
import json
import os
import re
import sys
import urllib.parse

MAX_EXPIRES = 900
MAX_SKEW = dt.timedelta(minutes=5)
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
AMZ_DATE = re.compile(r"^\d{8}T\d{6}Z$")


class Rejected(Exception):
    """The token is not valid; the message is the reason (never contains the token)."""


def parse_time(text):
    """ISO 8601 / RFC 3339 (a trailing Z allowed) -> aware UTC datetime."""
    text = text.strip()
    if text.endswith("Z") or text.endswith("z"):
        text = text[:-1] + "+00:00"
    value = dt.datetime.fromisoformat(text)
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(dt.timezone.utc)


def rfc3986(value):
    return urllib.parse.quote(value, safe="-_.~")


def parse_query(query):
    """Raw query -> ordered list of (name, decoded value); duplicate names rejected."""
    params = []
    seen = set()
    for part in query.split("&"):
        if not part:
            raise Rejected("empty query component")
        name, sep, value = part.partition("=")
        if not sep:
            raise Rejected("query component without '='")
        name = urllib.parse.unquote(name)
        if name in seen:
            raise Rejected("duplicate query parameter %s" % name)
        seen.add(name)
        params.append((name, urllib.parse.unquote(value)))
    return params


def hmac_sha256(key, msg):
    return hmac.new(key, msg.encode("utf-8"), hashlib.sha256).digest()


def signature(secret, date, region, service, string_to_sign):
    k = hmac_sha256(("AWS4" + secret).encode("utf-8"), date)
    k = hmac_sha256(k, region)
    k = hmac_sha256(k, service)
    k = hmac_sha256(k, "aws4_request")
    return hmac.new(k, string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()


def verify(token, user, keys, region, host, port, now):
    """Returns the access key id of a valid token; raises Rejected otherwise."""
    host_port, sep, query = token.partition("/?")
    if not sep or not host_port or not query:
        raise Rejected("not of the form HOST:PORT/?QUERY")
    expected_host_port = "%s:%s" % (host, port)
    if host_port != expected_host_port:
        raise Rejected("signed for %s, expected %s" % (host_port, expected_host_port))
    params = parse_query(query)
    p = dict(params)
    if p.get("Action") != "connect":
        raise Rejected("Action is not connect")
    if p.get("DBUser") != user:
        raise Rejected("DBUser %r does not match PAM user %r" % (p.get("DBUser"), user))
    if p.get("X-Amz-Algorithm") != "AWS4-HMAC-SHA256":
        raise Rejected("X-Amz-Algorithm is not AWS4-HMAC-SHA256")
    if p.get("X-Amz-SignedHeaders") != "host":
        raise Rejected("X-Amz-SignedHeaders is not host")
    scope = p.get("X-Amz-Credential", "").split("/")
    if len(scope) != 5 or scope[3] != "rds-db" or scope[4] != "aws4_request":
        raise Rejected("credential scope is not AKID/DATE/REGION/rds-db/aws4_request")
    akid, scope_date, scope_region = scope[0], scope[1], scope[2]
    if scope_region != region:
        raise Rejected("signed for region %s, expected %s" % (scope_region, region))
    amz_date = p.get("X-Amz-Date", "")
    if not AMZ_DATE.match(amz_date) or amz_date[:8] != scope_date:
        raise Rejected("X-Amz-Date malformed or not matching the credential scope date")
    signed_at = dt.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.timezone.utc)
    try:
        expires = int(p.get("X-Amz-Expires", ""))
    except ValueError:
        raise Rejected("X-Amz-Expires is not a number")
    if not 1 <= expires <= MAX_EXPIRES:
        raise Rejected("X-Amz-Expires %d outside 1..%d" % (expires, MAX_EXPIRES))
    if signed_at - now > MAX_SKEW:
        raise Rejected("X-Amz-Date %s is in the future" % amz_date)
    if now > signed_at + dt.timedelta(seconds=expires):
        raise Rejected("token expired at %s" % (signed_at + dt.timedelta(seconds=expires)).isoformat())
    key = keys.get(akid)
    if key is None:
        raise Rejected("unknown access key id %s" % akid)
    if key.get("expires"):
        key_expires = parse_time(key["expires"])
        if now >= key_expires:
            raise Rejected("credentials %s expired at %s" % (akid, key_expires.isoformat()))
    got = p.get("X-Amz-Signature", "")
    if params[-1][0] != "X-Amz-Signature" or not re.match(r"^[0-9a-f]{64}$", got):
        raise Rejected("X-Amz-Signature missing, misplaced or malformed")
    canonical_query = "&".join(
        "%s=%s" % (rfc3986(n), rfc3986(v))
        for n, v in sorted(params[:-1], key=lambda nv: (rfc3986(nv[0]), rfc3986(nv[1])))
    )
    canonical_request = "\n".join(
        ["GET", "/", canonical_query, "host:" + host_port, "", "host", EMPTY_SHA256]
    )
    string_to_sign = "\n".join(
        [
            "AWS4-HMAC-SHA256",
            amz_date,
            "/".join([scope_date, scope_region, "rds-db", "aws4_request"]),
            hashlib.sha256(canonical_request.encode("utf-8")).hexdigest(),
        ]
    )
    want = signature(key["secret"], scope_date, scope_region, "rds-db", string_to_sign)
    if not hmac.compare_digest(want, got):
        raise Rejected("signature mismatch for %s" % akid)
    return akid


def read_token(stream):
    data = stream.buffer.read(65536) if hasattr(stream, "buffer") else stream.read(65536)
    if isinstance(data, bytes):
        data = data.decode("utf-8", "replace")
    for end in ("\0", "\n"):
        data = data.split(end, 1)[0]
    return data.strip()


def log_line(path, user, ok, reason):
    if not path:
        return
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    with open(path, "a", encoding="utf-8") as f:
        f.write("%s user=%s result=%s reason=%s\n" % (stamp, user, "ok" if ok else "reject", reason))


def run(args):
    user = os.environ.get("PAM_USER", "")
    now = parse_time(args.now) if args.now else dt.datetime.now(dt.timezone.utc)
    # A server clock off by S seconds (positive: ahead of the signer's).
    now += dt.timedelta(seconds=args.skew_seconds)
    try:
        with open(args.keys, encoding="utf-8") as f:
            keys = json.load(f)
        token = read_token(sys.stdin)
        akid = verify(token, user, keys, args.region, args.host, args.port, now)
    except Rejected as e:
        log_line(args.log, user, False, str(e))
        return 1
    except Exception as e:  # a broken key file or input must reject, never crash open
        log_line(args.log, user, False, "verifier error: %s" % type(e).__name__)
        return 1
    log_line(args.log, user, True, "valid, signed by %s" % akid)
    return 0


def self_test(vectors_path):
    with open(vectors_path, encoding="utf-8") as f:
        vectors = json.load(f)
    failures = []

    def expect(label, valid, token, user, keys, region, host, port, now):
        try:
            verify(token, user, keys, region, host, port, now)
            got, why = True, "valid"
        except Rejected as e:
            got, why = False, str(e)
        status = "ok  " if got == valid else "FAIL"
        print("%s %-44s -> %s" % (status, label, why))
        if got != valid:
            failures.append(label)

    for v in vectors:
        token, user, host, port, region = v["expected_token"], v["user"], v["host"], v["port"], v["region"]
        akid = v["access_key_id"]
        keys = {akid: {"secret": v["secret_access_key"]}}
        signed = parse_time(v["signing_time"])
        later = signed + dt.timedelta(seconds=60)
        name = host.split(".")[0]
        expect(name + ": valid at signing time", True, token, user, keys, region, host, port, signed)
        expect(name + ": valid 60 s later", True, token, user, keys, region, host, port, later)
        flip = "0" if token[-1] != "0" else "1"
        expect(name + ": one flipped signature char", False, token[:-1] + flip, user, keys, region, host, port, later)
        expect(name + ": wrong user", False, token, user + "x", keys, region, host, port, later)
        expect(name + ": wrong host", False, token, user, keys, region, "other." + host, port, later)
        expect(name + ": wrong port", False, token, user, keys, region, host, port + 1, later)
        expect(name + ": wrong region", False, token, user, keys, "ap-south-1", host, port, later)
        expect(name + ": window expired (+901 s)", False, token, user, keys, region, host, port,
               signed + dt.timedelta(seconds=901))
        expect(name + ": from the future (-6 min)", False, token, user, keys, region, host, port,
               signed - dt.timedelta(minutes=6))
        expect(name + ": unknown key", False, token, user, {}, region, host, port, later)
        expired_key = {akid: {"secret": v["secret_access_key"], "expires": v["signing_time"]}}
        expect(name + ": signing credentials expired", False, token, user, expired_key, region, host, port, later)
        wrong_secret = {akid: {"secret": v["secret_access_key"] + "x"}}
        expect(name + ": wrong secret", False, token, user, wrong_secret, region, host, port, later)
        tampered = token.replace("X-Amz-Expires=900", "X-Amz-Expires=899")
        expect(name + ": tampered X-Amz-Expires", False, tampered, user, keys, region, host, port, later)
    print("self-test: %d failure(s)" % len(failures))
    return 1 if failures else 0


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keys")
    ap.add_argument("--region")
    ap.add_argument("--host")
    ap.add_argument("--port", type=int)
    ap.add_argument("--log")
    ap.add_argument("--now", help="RFC 3339 time to check against (tests)")
    ap.add_argument("--skew-seconds", type=int, default=0,
                    help="check as if this server's clock were off by this much (tests)")
    ap.add_argument("--self-test", action="store_true")
    ap.add_argument("--vectors", default=os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "data", "rds-iam-tokens.json"))
    args = ap.parse_args(argv)
    if args.self_test:
        return self_test(args.vectors)
    if not (args.keys and args.region and args.host and args.port):
        ap.error("--keys, --region, --host and --port are required")
    return run(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
