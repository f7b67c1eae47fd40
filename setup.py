"""Build of the optional C extensions; everything else is in pyproject.toml.

`guard.broker.pgwire._cframe` is the compiled twin of the relay's byte scanning in
guard/broker/pgwire/parser.py (see guard/broker/proxy/speedups.py); `guard.broker.audit.
_cfsync` is the audit group commit's fsync thread (see guard/broker/audit/commit.py), and
`guard.broker.audit._cseal` seals a statement record (guard/broker/audit/serialize.py's
`seal_record`), and `guard.broker.sql._cshape` normalizes the plainest statements with
inlined values (guard/broker/sql/shape.py's `literal_shape`). All are optional: when one cannot be built (no compiler, no Python headers,
no OpenSSL headers for _cseal), setuptools prints a warning and the install goes on without
it, and guard runs its pure-Python code.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "guard.broker.pgwire._cframe",
            sources=["guard/broker/pgwire/_cframe.c"],
            optional=True,  # a failed build is a warning, not a failed install
        ),
        # The audit group commit's fsync thread, which never takes the GIL
        # (guard/broker/audit/commit.py); optional in the same way.
        Extension(
            "guard.broker.audit._cfsync",
            sources=["guard/broker/audit/_cfsync.c"],
            optional=True,
        ),
        # One statement record completed and sealed (guard/broker/audit/serialize.py's
        # seal_record); needs OpenSSL's headers, optional in the same way.
        Extension(
            "guard.broker.audit._cseal",
            sources=["guard/broker/audit/_cseal.c"],
            libraries=["crypto"],
            optional=True,
        ),
        # The normalized text of a plain statement with inlined values, without a parse
        # (guard/broker/sql/shape.py's literal_shape); optional in the same way.
        Extension(
            "guard.broker.sql._cshape",
            sources=["guard/broker/sql/_cshape.c"],
            optional=True,
        ),
    ]
)
