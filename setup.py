"""Build of the optional C extension; everything else is in pyproject.toml.

`guard.broker.pgwire._cframe` is the compiled twin of the relay's byte scanning in
guard/broker/pgwire/parser.py (see guard/broker/proxy/speedups.py). It is optional: when it
cannot be built (no compiler, no Python headers), setuptools prints a warning and the
install goes on without it, and guard runs its pure-Python code.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "guard.broker.pgwire._cframe",
            sources=["guard/broker/pgwire/_cframe.c"],
            optional=True,  # a failed build is a warning, not a failed install
        )
    ]
)
