"""Signs RDS IAM tokens with botocore, for the signer differential test.

Reads a JSON list of cases on stdin (host, port, user, region, access_key_id,
secret_access_key, session_token or null, unix_time) and writes the JSON list of tokens
botocore's generate_db_auth_token returns for them, with its clock frozen at each case's time.
"""

import datetime
import json
import sys
from unittest import mock

import botocore.auth
import botocore.session


def main():
    cases = json.load(sys.stdin)
    session = botocore.session.get_session()
    tokens = []
    for case in cases:
        client = session.create_client(
            "rds",
            region_name=case["region"],
            aws_access_key_id=case["access_key_id"],
            aws_secret_access_key=case["secret_access_key"],
            aws_session_token=case["session_token"],
        )
        at = datetime.datetime.fromtimestamp(case["unix_time"], datetime.timezone.utc)
        at = at.replace(tzinfo=None)
        with mock.patch.object(botocore.auth, "get_current_datetime", return_value=at):
            tokens.append(
                client.generate_db_auth_token(
                    case["host"], case["port"], case["user"], Region=case["region"]
                )
            )
    json.dump(tokens, sys.stdout)


if __name__ == "__main__":
    main()
