"""Shared fixtures, as plugins: real PostgreSQL, OpenBao, and the whole demo stack."""

pytest_plugins = ["tests.fix_pg", "tests.fix_openbao", "tests.fix_stack"]
