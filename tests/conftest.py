"""Shared fixtures: real PostgreSQL/OpenBao (fix_pg) and the whole demo stack (fix_stack)."""

pytest_plugins = ["tests.fix_pg", "tests.fix_stack"]
