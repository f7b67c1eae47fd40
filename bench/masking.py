"""Benchmark: masked bulk reads — the base table, its masking view, and `guard exec` — in one run.

    .venv/bin/python bench/masking.py [--rows 1000000] [--runs 3]

Starts the demo stack (`guard dev up` in a throwaway GUARD_HOME), grows `customers` to
--rows customer-like rows (three protected columns: ssn, email, dob), then reads every row
with `SELECT *` (a named cursor, 10 000 rows per fetch) and with `COPY … TO STDOUT`, the
same psycopg client code on three paths, interleaved, the median of --runs kept:

* base   — `public.customers` straight from PostgreSQL as its admin (unmasked: the floor);
* view   — `guard_masked.customers`, the masking view, straight from PostgreSQL;
* guard  — `customers` through `guard exec --db demo -- python reader.py` as alice (session,
           the gateway over verified TLS, analysis, policy, audit, teardown: the user's
           path; COPY customers TO STDOUT is redirected to COPY (SELECT …) TO).

Prints rows/s per path, guard's ratio to the view read directly (goal ≥ 0.95), the view's
mask cost per row per masked column (goal ≤ 0.3 µs) two ways — end to end ((view − base) /
rows / 3, client decoding included) and inside PostgreSQL (count(mask(col)) − count(col),
per column) — and the gateway's CPU ns per row. Numbers on a shared 2-core machine are
noisy: compare within a run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import GUARD, ROOT, admin_env, demo_stack, gateway_times  # noqa: E402

from guard.broker.masking.strategies import get_strategy  # noqa: E402

MASKED_COLUMNS = 3  # ssn, email, dob
READER = textwrap.dedent(
    """
    import json, os, sys, time
    import psycopg
    conninfo, relation, source = sys.argv[1] or os.environ["DATABASE_URL"], *sys.argv[2:4]
    out = {}
    with psycopg.connect(conninfo) as conn:
        start = time.perf_counter()
        rows = 0
        with conn.cursor(name="bench") as cur:
            cur.itersize = 10000
            cur.execute(f"SELECT * FROM {relation}")
            for _ in cur:
                rows += 1
        out["select"] = (rows, time.perf_counter() - start)
        start = time.perf_counter()
        size = 0
        with conn.cursor().copy(f"COPY {source} TO STDOUT") as copy:
            for chunk in copy:
                size += len(chunk)
        out["copy"] = (size, time.perf_counter() - start)
        conn.rollback()
    print(json.dumps(out))
    """
)
GROW = """
INSERT INTO customers (full_name, ssn, email, dob, phone)
SELECT 'Customer ' || i,
       (900 + i / 1000000)::text || '-' || lpad(((i / 10000) %% 100)::text, 2, '0') || '-'
         || lpad((i %% 10000)::text, 4, '0'),
       'user' || i || '@example.com',
       date '1950-01-01' + (i %% 20000),
       '555-' || lpad((i %% 10000)::text, 4, '0')
FROM generate_series(1, %s) AS i
ON CONFLICT DO NOTHING
"""


def mask_cost_in_server(conn: psycopg.Connection) -> dict[str, float]:
    """Each masked column's mask expression cost inside PostgreSQL, ns per row: the
    best of 5 `count(mask(col))` minus the best of 5 `count(col)` over the table (no client
    and no network in it, unlike the end-to-end view − base figure)."""
    from guard.broker.policy.compile import load_policy_file

    target = load_policy_file(ROOT / "guard/devstack/policies.yaml").targets["demo"]
    total = conn.execute("SELECT count(*) FROM customers").fetchone()[0]

    def best(expression: str) -> float:
        times = []
        for _ in range(5):
            start = time.perf_counter()
            conn.execute(f"SELECT count({expression}) FROM public.customers").fetchone()
            times.append(time.perf_counter() - start)
        return min(times)

    costs = {}
    for column, strategy in target.protected_columns.items():
        if (column.schema, column.table) != ("public", "customers"):
            continue
        masked = get_strategy(strategy).sql_expression(column.column)
        costs[column.column] = (best(masked) - best(column.column)) / total * 1e9
    return costs


def read(argv: list[str], env: dict[str, str]) -> dict[str, tuple[int, float]]:
    out = subprocess.run(argv, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{argv[:3]} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("GUARD_DEV_GATEWAY_WORKERS", "1")
    with demo_stack() as (env, status), tempfile.TemporaryDirectory() as tmp:
        reader = Path(tmp) / "reader.py"
        reader.write_text(READER)
        admin = status["upstream_dsn"]
        with psycopg.connect(admin) as conn:
            have = conn.execute("SELECT count(*) FROM customers").fetchone()[0]
            conn.execute(GROW, (max(0, args.rows - have),))
            conn.execute("ANALYZE customers")
            total = conn.execute("SELECT count(*) FROM customers").fetchone()[0]
            server_cost = mask_cost_in_server(conn)
        subprocess.run([*GUARD, "dev", "login", "alice"], env=env, check=True, capture_output=True)
        broker = int(status["pids"]["broker"])
        direct = admin_env(status, sslmode="verify-full")
        direct_dsn = (
            f"host={direct['PGHOST']} port={direct['PGPORT']} user={direct['PGUSER']} "
            f"password={direct['PGPASSWORD']} dbname=demo sslmode=verify-full "
            f"sslrootcert={direct['PGSSLROOTCERT']}"
        )
        paths = {
            "base": [sys.executable, str(reader), direct_dsn, "public.customers"]
            + ["public.customers"],
            # A view is copied through a query (COPY view TO is refused).
            "view": [sys.executable, str(reader), direct_dsn, "guard_masked.customers"]
            + ["(SELECT * FROM guard_masked.customers)"],
            "guard": [
                *GUARD,
                "exec",
                "--db",
                "demo",
                "--",
                sys.executable,
                str(reader),
                "",
                "customers",
                "customers",  # the gateway redirects COPY customers TO to the view
            ],
        }
        results: dict[str, list[dict[str, tuple[int, float]]]] = {k: [] for k in paths}
        cpu: list[float] = []
        for _ in range(args.runs):
            for name, argv in paths.items():
                before = sum(gateway_times(broker))
                results[name].append(read(argv, env))
                if name == "guard":
                    cpu.append(sum(gateway_times(broker)) - before)
    print(f"{total} customer rows, {MASKED_COLUMNS} masked columns, median of {args.runs} runs")
    head = f"{'':10} {'base':>10} {'view':>10} {'guard':>10} {'guard/view':>11}"
    print(f"{head} {'mask µs/row/col':>16}")
    for what in ("select", "copy"):
        secs = {k: statistics.median(r[what][1] for r in results[k]) for k in paths}
        rates = {k: total / secs[k] for k in paths}
        mask_us = (secs["view"] - secs["base"]) / total / MASKED_COLUMNS * 1e6
        print(
            f"{what.upper():10} {rates['base']:10.0f} {rates['view']:10.0f} {rates['guard']:10.0f}"
            f" {rates['guard'] / rates['view']:11.2f} {mask_us:16.3f}   rows/s"
        )
    for column, ns in server_cost.items():
        print(f"mask cost in PostgreSQL, {column}: {ns:.0f} ns per row (count(mask) - count(col))")
    mean = sum(server_cost.values()) / len(server_cost) / 1000
    print(f"mask cost in PostgreSQL, mean: {mean:.3f} µs per row per masked column")
    gw = statistics.median(cpu) / (2 * total) * 1e9
    print(f"gateway CPU: {gw:.0f} ns per row (SELECT and COPY, user+system)")
    print("goals: guard/view >= 0.95; mask cost <= 0.3 µs per row per masked column")
    return 0


if __name__ == "__main__":
    sys.exit(main())
