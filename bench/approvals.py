"""Benchmark: how fast a held statement runs once it is approved (issue 11's resume latency).

    .venv/bin/python bench/approvals.py [--approvals 50]

Starts the demo stack (`guard dev up`) with the demo policy's approval rule made to cover
one statement (no window, so every read of `transactions` is a new request), opens a
session for alice and connects to the gateway over verified TLS like any client. Then,
`--approvals` times: alice's `SELECT ... FROM transactions` is held; once the gateway's
NoticeResponse names the request, bob approves it through the broker API. Printed, p50 and
p95 over the runs:

- decided → forwarded: from the audit record of bob's approval ("approved") to the record
  of the database grant ("granted"), which the gateway forwards the statement right after
  (the broker's own clock; the part the issue's goal, p50 ≤ 50 ms, is about);
- approve call → rows: from bob's POST leaving the benchmark to alice's rows arriving (what
  a person sees: the API, segregation of duties, the store and audit writes, the grant,
  the statement itself).
"""

from __future__ import annotations

import argparse
import ssl
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import GUARD, demo_stack, sh  # noqa: E402 - the shared bench helpers

ROOT = Path(__file__).resolve().parent.parent
SQL = "SELECT id FROM transactions ORDER BY id LIMIT 1"


def _token(env: dict[str, str], user: str) -> dict[str, str]:
    token = sh([*GUARD, "dev", "token", user], env=env).stdout.strip()
    return {"Authorization": f"Bearer {token}"}


def _audit_times(path: Path, request_id: str) -> dict[str, datetime]:
    import json

    from guard.broker.audit.record import expand

    times: dict[str, datetime] = {}
    for line in path.read_text().splitlines():
        for body in expand(json.loads(line)["body"]):
            if body.get("kind") == "approval" and body["request_id"] == request_id:
                times.setdefault(body["event"], datetime.fromisoformat(body["time"]))
    return times


def _percentiles(values: list[float]) -> str:
    ordered = sorted(values)
    p95 = ordered[max(0, round(0.95 * len(ordered)) - 1)]
    return f"p50 {statistics.median(ordered):6.1f} ms   p95 {p95:6.1f} ms"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--approvals", type=int, default=50)
    args = parser.parse_args()
    policy = Path(tempfile.mkdtemp(prefix="guard-bench-policy-")) / "policies.yaml"
    policy.write_text((ROOT / "policies.yaml").read_text().replace(", window: 30m", ""))
    with demo_stack("--policy", str(policy)) as (env, status):
        broker = status["broker_url"]
        # The broker API is HTTPS, verified against the dev stack's CA.
        verify = ssl.create_default_context(cafile=status["broker_ca"])
        alice, bob = _token(env, "alice"), _token(env, "bob")
        created = httpx.post(
            f"{broker}/v1/sessions",
            json={"target": "demo", "reason": "bench"},
            headers=alice,
            verify=verify,
        ).json()
        notices: list[str] = []
        conn = psycopg.connect(
            host=created["gateway_host"],
            port=created["gateway_port"],
            user=created["user"],
            password=created["password"],
            dbname=created["database"],
            sslmode="verify-full",
            sslrootcert=status["gateway_ca"],
            autocommit=True,
        )
        conn.add_notice_handler(lambda n: notices.append(n.message_primary or ""))
        decided_to_forwarded: list[float] = []
        call_to_rows: list[float] = []
        with httpx.Client(headers=bob, timeout=30, verify=verify) as http:
            for _ in range(args.approvals):
                notices.clear()
                rows: list[tuple[object, ...]] = []
                worker = threading.Thread(
                    target=lambda out=rows: out.extend(conn.execute(SQL).fetchall()),
                    daemon=True,
                )
                worker.start()
                while not notices:
                    time.sleep(0.001)
                words = notices[0].split()
                request_id = words[words.index("request") + 1]
                start = time.perf_counter()
                http.post(f"{broker}/v1/approvals/{request_id}/approve", json={})
                worker.join(30)
                call_to_rows.append((time.perf_counter() - start) * 1000)
                assert rows, "the approved statement returned nothing"
                times: dict[str, datetime] = {}
                for _wait in range(50):  # the grant's record may be a moment behind
                    times = _audit_times(Path(status["audit_log"]), request_id)
                    if "granted" in times:
                        break
                    time.sleep(0.02)
                delta = times["granted"] - times["approved"]
                decided_to_forwarded.append(delta.total_seconds() * 1000)
        conn.close()
    print(f"approvals: {args.approvals}, statement: {SQL}")
    print(f"decided → forwarded   {_percentiles(decided_to_forwarded)}   (goal: p50 ≤ 50 ms)")
    print(f"approve call → rows   {_percentiles(call_to_rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
