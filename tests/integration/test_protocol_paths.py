"""Protocol paths through the real gateway that other tests do not reach: CopyFail,
NoticeResponse, Flush without Sync, psql's \\copy from stdin/file, and large unmasked
results in text and binary. Each is compared with the same thing done directly on
PostgreSQL (admin DSN), which has at least the session's rights on what is touched."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from decimal import Decimal

import psycopg
import pytest
from psycopg import pq

from guard.broker.pgwire import messages as m
from guard.broker.pgwire.encoder import encode, encode_many
from guard.broker.sql.fingerprint import normalize
from tests.fix_stack import Stack
from tests.integration.test_gateway import connect, session  # noqa: F401 - module fixture
from tests.integration.test_gateway_startup import Wire, gateway, upstream_address

pytestmark = pytest.mark.integration


def direct_connect(stack: Stack, **kwargs) -> psycopg.Connection:
    return psycopg.connect(stack.admin_dsn, connect_timeout=10, **kwargs)


def both(stack: Stack, sess: dict, **kwargs):
    """(gateway connection, direct connection) with the same options."""
    return connect(sess, **kwargs), direct_connect(stack, **kwargs)


def tagged_products(stack: Stack, tag: str) -> list[tuple]:
    return stack.direct(
        "SELECT name, kind, rate FROM products WHERE name LIKE %s ORDER BY name", (tag + "%",)
    )


def delete_tagged(stack: Stack, tag: str) -> None:
    with direct_connect(stack, autocommit=True) as admin:
        admin.execute("DELETE FROM products WHERE name LIKE %s", (tag + "%",))


# ------------------------------------------------------------------------ 1. CopyFail
class Boom(Exception):
    pass


def copy_fail_with_psycopg(conn: psycopg.Connection, tag: str) -> None:
    """A Python exception inside cursor.copy(): psycopg sends CopyFail and re-raises it."""
    with pytest.raises(Boom):
        with conn.cursor().copy("COPY products (name, kind, rate) FROM STDIN") as cp:
            cp.write_row((f"{tag}-1", "test", Decimal("1.5")))
            cp.write_row((f"{tag}-2", "test", Decimal("2.5")))
            raise Boom("client gave up")


def copy_fail_with_libpq(conn: psycopg.Connection, tag: str) -> tuple[str, str, str, bytes]:
    """CopyData then CopyFail at the libpq level: (result status, SQLSTATE, primary
    message, transaction status) of the server's answer."""
    pg = conn.pgconn
    pg.send_query(b"COPY products (name, kind, rate) FROM STDIN")
    res = pg.get_result()
    assert res.status == pq.ExecStatus.COPY_IN, res.error_message
    assert pg.put_copy_data(f"{tag}-3\ttest\t3.5\n".encode()) == 1
    assert pg.put_copy_end(b"stopped by the test") == 1
    while pg.flush():
        pass
    res = pg.get_result()
    answer = (
        pq.ExecStatus(res.status).name,
        (res.error_field(pq.DiagnosticField.SQLSTATE) or b"").decode(),
        (res.error_field(pq.DiagnosticField.MESSAGE_PRIMARY) or b"").decode(),
    )
    while pg.get_result() is not None:
        pass
    return (*answer, pq.TransactionStatus(pg.transaction_status).name)


def test_copy_fail_same_error_no_rows_connection_usable(dev_stack: Stack, session):  # noqa: F811
    tag = f"protopaths-copyfail-{uuid.uuid4().hex[:8]}"
    seen = {}
    try:
        openers = {
            "gateway": lambda: connect(session, autocommit=True),
            "direct": lambda: direct_connect(dev_stack, autocommit=True),
        }
        for where, opener in openers.items():
            with opener() as conn:
                copy_fail_with_psycopg(conn, tag)
                assert conn.execute("SELECT 1").fetchone() == (1,)
                libpq_answer = copy_fail_with_libpq(conn, tag)
                assert conn.execute("SELECT 2").fetchone() == (2,)
                # In a transaction: the failed COPY aborts it, as any error does.
                conn.autocommit = False
                copy_fail_with_psycopg(conn, tag)
                in_tx_status = conn.info.transaction_status.name
                with pytest.raises(psycopg.errors.InFailedSqlTransaction):
                    conn.execute("SELECT 3")
                conn.rollback()
                assert conn.execute("SELECT 4").fetchone() == (4,)
                conn.rollback()
            seen[where] = (libpq_answer, in_tx_status)
            assert tagged_products(dev_stack, tag) == [], f"{where}: rows written"
        status, sqlstate, message, tx = seen["direct"][0]
        assert (status, sqlstate, tx) == ("FATAL_ERROR", "57014", "IDLE")
        assert message == "COPY from stdin failed: stopped by the test"
        assert seen["direct"][1] == "INERROR"
        assert seen["gateway"] == seen["direct"]
    finally:
        delete_tagged(dev_stack, tag)


# -------------------------------------------------------------------- 2. NoticeResponse
NOTICE_STATEMENTS = [
    ["ROLLBACK"],  # WARNING 25P01 there is no transaction in progress
    ["COMMIT"],  # WARNING 25P01
    ["BEGIN", "BEGIN", "ROLLBACK"],  # WARNING 25001 already a transaction in progress
    ["SET client_min_messages = warning", "ROLLBACK", "RESET client_min_messages"],
    ["SET client_min_messages = error", "ROLLBACK", "RESET client_min_messages"],  # none
]


def collect_notices(conn: psycopg.Connection) -> list[tuple]:
    got: list[tuple] = []

    def handler(diag: psycopg.errors.Diagnostic) -> None:
        got.append(
            (
                diag.severity,
                diag.severity_nonlocalized,
                diag.sqlstate,
                diag.message_primary,
                diag.message_detail,
                diag.message_hint,
            )
        )

    conn.add_notice_handler(handler)
    out = []
    for statements in NOTICE_STATEMENTS:
        for binary in (False, True):  # simple query, then extended protocol
            got.clear()
            cur = conn.cursor(binary=binary)
            for sql in statements:
                cur.execute(sql)
            out.append((statements, binary, list(got)))
        # Notices never disturb the connection.
        assert conn.execute("SELECT 1").fetchone() == (1,)
    conn.remove_notice_handler(handler)
    return out


def test_notices_reach_the_client_like_direct(dev_stack: Stack, session):  # noqa: F811
    gw, dr = both(dev_stack, session, autocommit=True)
    with gw, dr:
        through_gateway = collect_notices(gw)
        direct = collect_notices(dr)
    # The direct run does produce notices (the comparison is not vacuous) ...
    assert direct[0][2] and direct[0][2][0][1:3] == ("WARNING", "25P01")
    assert any(notices and notices[0][2] == "25001" for _, _, notices in direct)
    assert direct[-1][2] == []
    # ... and the gateway delivers exactly the same ones.
    assert through_gateway == direct


# --------------------------------------------------------------- 3. Flush without Sync
def direct_body(stack: Stack) -> dict:
    info = psycopg.conninfo.conninfo_to_dict(stack.admin_dsn)
    return {
        "user": info["user"],
        "database": info.get("dbname", info["user"]),
        "password": info["password"],
    }


def until(wire: Wire, kind: type) -> list[m.BackendMessage]:
    """Messages up to and including the first `kind`; every read is bounded (a hang fails)."""
    out = []
    while True:
        msg = wire.message()
        out.append(msg)
        if isinstance(msg, kind):
            return out


def norm(msgs: list[m.BackendMessage]) -> list:
    """Errors compared by severity and SQLSTATE (their position fields are PostgreSQL's)."""
    return [
        ("ErrorResponse", x.severity, x.sqlstate) if isinstance(x, m.ErrorResponse) else x
        for x in msgs
    ]


FLUSH_SQL = "SELECT n, 'row ' || n AS label, n * 1.5 AS half FROM generate_series(1, $1::int) n"


def flush_dialogue(wire: Wire) -> list:
    """Extended-protocol exchanges each ended by Flush, with Sync only at the end."""
    transcript = []
    # (a) Parse/Bind/Describe/Execute + Flush: everything arrives without a Sync.
    wire.send(
        encode_many(
            [
                m.Parse("", FLUSH_SQL, ()),
                m.Bind("", "", (0,), (b"3",), (0, 1, 0)),
                m.Describe(b"P", ""),
                m.Execute("", 0),
                m.Flush(),
            ]
        )
    )
    got = until(wire, m.CommandComplete)
    assert [type(x).__name__ for x in got] == [
        "ParseComplete",
        "BindComplete",
        "RowDescription",
        "DataRow",
        "DataRow",
        "DataRow",
        "CommandComplete",
    ]
    assert wire.nothing_pending(0.3), "more than the answers before Sync"
    transcript.append(got)
    # (b) A named statement, a portal run in pieces: PortalSuspended after each Flush.
    wire.send(
        encode_many(
            [
                m.Parse("s1", FLUSH_SQL, (23,)),
                m.Describe(b"S", "s1"),
                m.Bind("p1", "s1", (0,), (b"5",), ()),
                m.Execute("p1", 2),
                m.Flush(),
            ]
        )
    )
    transcript.append(until(wire, m.PortalSuspended))
    assert wire.nothing_pending(0.3)
    wire.send(encode_many([m.Execute("p1", 0), m.Flush()]))
    transcript.append(until(wire, m.CommandComplete))
    assert wire.nothing_pending(0.3)
    wire.send(encode_many([m.Close(b"P", "p1"), m.Close(b"S", "s1"), m.Flush()]))
    transcript.append(until(wire, m.CloseComplete) + until(wire, m.CloseComplete))
    assert wire.nothing_pending(0.3)
    # (c) Sync ends the implicit transaction: ReadyForQuery, idle.
    wire.send(encode(m.Sync()))
    transcript.append(until(wire, m.ReadyForQuery))
    assert transcript[-1][-1] == m.ReadyForQuery(b"I")
    # (d) An error before Sync is flushed too; the rest is skipped until Sync.
    wire.send(
        encode_many(
            [
                m.Parse("", "SELECT 1/$1::int", ()),
                m.Bind("", "", (0,), (b"0",), ()),
                m.Execute("", 0),
                m.Flush(),
            ]
        )
    )
    transcript.append(until(wire, m.ErrorResponse))
    assert wire.nothing_pending(0.3)
    wire.send(encode_many([m.Parse("", "SELECT 1", ()), m.Flush()]))
    assert wire.nothing_pending(0.3), "messages after an error must be skipped until Sync"
    wire.send(encode(m.Sync()))
    transcript.append(until(wire, m.ReadyForQuery))
    assert transcript[-1] == [m.ReadyForQuery(b"I")]
    wire.send(encode(m.Query("SELECT 42")))
    transcript.append(until(wire, m.ReadyForQuery))
    return [norm(x) for x in transcript]


def test_flush_without_sync_answers_like_direct(dev_stack: Stack, session):  # noqa: F811
    with gateway(session) as gw:  # verified TLS
        gw.login(session)
        through_gateway = flush_dialogue(gw)
    host, port = upstream_address(dev_stack)
    with Wire(host, port) as dr:
        dr.login(direct_body(dev_stack))
        direct = flush_dialogue(dr)
    assert direct[-3][-1] == ("ErrorResponse", "ERROR", "22012")
    assert through_gateway == direct


def test_refusal_before_sync_is_flushed(session):  # noqa: F811
    """A statement the policy refuses, followed by Flush: the refusal arrives without a
    Sync, as PostgreSQL's own errors do, and later messages are skipped until Sync."""
    with gateway(session) as gw:  # verified TLS
        gw.login(session)
        gw.send(encode_many([m.Parse("", "DROP TABLE products", ()), m.Flush()]))
        (err,) = until(gw, m.ErrorResponse)
        assert (err.severity, err.sqlstate) == ("ERROR", "42501")
        assert gw.nothing_pending(0.3)
        gw.send(encode_many([m.Bind("", "", (), (), ()), m.Execute("", 0), m.Flush()]))
        assert gw.nothing_pending(0.3), "messages after the refusal must be skipped"
        gw.send(encode(m.Sync()))
        assert until(gw, m.ReadyForQuery) == [m.ReadyForQuery(b"I")]
        gw.send(encode(m.Query("SELECT 5")))
        got = until(gw, m.ReadyForQuery)
        assert m.DataRow((b"5",)) in got


# ------------------------------------------------------------- 4. psql \copy from stdin
def run_psql(env: dict, dsn: str | None, commands: list[str], stdin: str):
    cmd = ["psql", "-X", "-v", "ON_ERROR_STOP=1", *([dsn] if dsn else [])]
    for c in commands:
        cmd += ["-c", c]
    return subprocess.run(cmd, input=stdin, env=env, capture_output=True, text=True, timeout=30)


@pytest.mark.skipif(shutil.which("psql") is None, reason="psql not on PATH")
def test_psql_copy_from_stdin_and_file_like_direct(dev_stack: Stack, session, tmp_path):  # noqa: F811
    gw_env = dev_stack.libpq_env(session)
    plain_env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    results = {}
    tag = f"protopaths-psql-{uuid.uuid4().hex[:8]}"
    try:
        for where, env, dsn in (
            ("gateway", gw_env, None),
            ("direct", plain_env, dev_stack.admin_dsn),
        ):
            prefix = f"{tag}-{where}"
            stdin_rows = "".join(f"{prefix}-in-{i}\tstdin ✓\t{i}.25\n" for i in range(50))
            data_file = tmp_path / f"{where}.csv"
            data_file.write_text(
                "".join(f'{prefix}-file-{i},"file, ü",{i}.75\n' for i in range(30))
            )
            ok = run_psql(
                env,
                dsn,
                [
                    r"\copy products (name, kind, rate) from stdin",
                    rf"\copy products (name, kind, rate) from '{data_file}' with (format csv)",
                ],
                stdin_rows + "\\.\n",
            )
            # Bad data on line 2: PostgreSQL's error, nothing of the copy kept.
            bad = run_psql(
                env,
                dsn,
                [r"\copy products (name, kind, rate) from stdin"],
                f"{prefix}-bad-1\tx\t1\n{prefix}-bad-2\tx\tnot-a-number\n\\.\n",
            )
            after = run_psql(env, dsn, ["SELECT 'still fine'"], "")
            rows = tagged_products(dev_stack, prefix)
            results[where] = (
                (ok.returncode, ok.stdout, ok.stderr),
                (bad.returncode, bad.stdout, bad.stderr),
                (after.returncode, after.stdout),
                [(name.replace(prefix, ""), kind, rate) for name, kind, rate in rows],
            )
        ok, bad, after, rows = results["direct"]
        assert ok == (0, "COPY 50\nCOPY 30\n", "")
        assert bad[0] != 0 and "not-a-number" in bad[2]
        assert after[0] == 0 and "still fine" in after[1]
        assert len(rows) == 80 and not any("-bad-" in r[0] for r in rows)
        assert results["gateway"] == results["direct"]
    finally:
        delete_tagged(dev_stack, tag)


# ------------------------------------------------- 5. large unmasked results, raw bytes
BIG_SQL = """
SELECT n,
       'row ' || n || ' äöü ✓ 日本' AS label,
       (n * 1.25)::numeric(12, 3) AS amount,
       n::float8 / 7 AS ratio,
       decode(md5(n::text), 'hex') AS digest,
       CASE WHEN n % 7 = 0 THEN NULL ELSE n % 3 = 0 END AS flag,
       CASE WHEN n % 5 = 0 THEN NULL ELSE repeat('x', n % 50) END AS maybe,
       timestamptz '2024-01-01 00:00:00+00' + n * interval '1 minute' AS at,
       ARRAY[n, n + 1, NULL] AS arr,
       jsonb_build_object('n', n, 'ü', 'é') AS doc,
       n::int8 * 1000003 AS big
FROM generate_series(1, 3000) n
ORDER BY n
"""


def raw_result(conn: psycopg.Connection, fmt: int) -> tuple:
    """Field descriptions and every value's raw bytes, at the libpq level."""
    res = conn.pgconn.exec_params(BIG_SQL.encode(), [], result_format=fmt)
    assert res.status == pq.ExecStatus.TUPLES_OK, res.error_message
    fields = [
        (res.fname(c), res.ftype(c), res.fformat(c), res.fmod(c), res.fsize(c))
        for c in range(res.nfields)
    ]
    rows = [tuple(res.get_value(r, c) for c in range(res.nfields)) for r in range(res.ntuples)]
    return fields, rows, res.command_status


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_large_unmasked_result_byte_identical(dev_stack: Stack, session, binary):  # noqa: F811
    gw, dr = both(dev_stack, session, autocommit=True)
    with gw, dr:
        for conn in (gw, dr):
            conn.execute("SET TimeZone = 'UTC'")
            conn.execute("SET extra_float_digits = 1")
        g_fields, g_rows, g_status = raw_result(gw, int(binary))
        d_fields, d_rows, d_status = raw_result(dr, int(binary))
        assert len(d_rows) == 3000 and d_status == b"SELECT 3000"
        assert any(v is None for v in d_rows[34])  # NULLs present (n = 35)
        assert all(f[2] == int(binary) for f in d_fields)
        assert g_fields == d_fields
        assert g_status == d_status
        for i, (g, d) in enumerate(zip(g_rows, d_rows, strict=True)):
            assert g == d, f"row {i} differs"
        # The same through psycopg cursors (loaders on top of the same bytes).
        g_loaded = gw.cursor(binary=binary).execute(BIG_SQL).fetchall()
        d_loaded = dr.cursor(binary=binary).execute(BIG_SQL).fetchall()
        assert g_loaded == d_loaded


# ------------------------------------------------- 6. a failed pipeline's skipped names
def test_a_reparse_skipped_after_an_error_leaves_the_statement_as_it_was(
    dev_stack: Stack,
    session,  # noqa: F811
):
    # PostgreSQL skips every message after an error until Sync, re-Parse and Close
    # included: s1 stays the SSN query. guard must mask and record its next Execute as
    # that (here without a Describe, so only guard's knowledge of s1 says what it returns).
    ssn_sql = "SELECT ssn FROM customers WHERE id = 1 / $1::int"
    with gateway(session) as wire:
        wire.login(session)
        wire.send(encode_many([m.Parse("s1", ssn_sql, ()), m.Sync()]))
        assert [type(x) for x in wire.until_ready()] == [m.ParseComplete]
        wire.send(
            encode_many(
                [
                    m.Bind("", "s1", (), (b"0",), ()),  # division by zero (planned at Bind)
                    m.Execute("", 0),
                    m.Parse("s1", "SELECT name FROM products WHERE id = $1::int", ()),
                    m.Close(b"S", "s1"),
                    m.Sync(),
                ]
            )
        )
        # One error, then nothing: the re-Parse and the Close were skipped.
        assert norm(wire.until_ready()) == [("ErrorResponse", "ERROR", "22012")]
        wire.send(encode_many([m.Bind("", "s1", (), (b"1",), ()), m.Execute("", 0), m.Sync()]))
        rows = [x for x in wire.until_ready() if isinstance(x, m.DataRow)]
    assert rows == [m.DataRow((b"***-**-6789",))]
    executed = [
        r
        for r in dev_stack.audit_records()
        if r.get("session_id") == session["session_id"] and r.get("kind") == "statement"
    ]
    assert executed[-1]["statement"] == normalize(ssn_sql)  # the SSN query, not products
