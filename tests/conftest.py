"""Shared fixtures, as plugins: real PostgreSQL, OpenBao, and the whole demo stack."""

pytest_plugins = ["tests.fix_pg", "tests.fix_openbao", "tests.fix_stack"]


def pytest_sessionfinish(session) -> None:
    # CPython 3.11 (before 3.11.8) aborts an AST build with "AST constructor recursion depth
    # mismatch" when garbage collection runs finalizers in the middle of it (cpython#106905).
    # Hypothesis's plugin imports hypothesis lazily at the terminal summary, and pytest
    # rewrites (parses) it then: collect the run's garbage (closed sockets, transports) first.
    import gc

    gc.collect()
