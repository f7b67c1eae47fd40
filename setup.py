"""Build of the optional C extensions; everything else is in pyproject.toml.

- `guard.broker.pgwire._cframe`: the relay's byte scanning, twin of
  guard/broker/pgwire/parser.py (see guard/broker/proxy/speedups.py);
- `guard.broker.audit._cfsync`: the audit group commit's fsync thread
  (guard/broker/audit/commit.py);
- `guard.broker.audit._cseal`: a statement record sealed, and result records as JSON
  (guard/broker/audit/serialize.py's references), and the sink's common case
  (`HotPath`, guard/broker/audit/sink.py's the reference); needs OpenSSL's headers;
- `guard.broker.sql._cshape`: the plainest statements with inlined values normalized
  (guard/broker/sql/shape.py's `literal_shape`);
- `guard.broker.proxy._cconnection`: guard/broker/proxy/connection.py compiled by Cython as
  it is, with the declarations in connection.pxd (guard/broker/proxy/core.py);
- `guard.broker.proxy._cpump`: guard/broker/proxy/pump.py, the connection's asyncio shell,
  compiled the same way with pump.pxd.

All are optional: when one cannot be built (no compiler, no Python headers, no Cython),
setuptools prints a warning and the install goes on without it, and guard runs its
pure-Python code.
"""

import hashlib
import shutil
from pathlib import Path

from setuptools import Extension, setup

PROXY = Path("guard/broker/proxy")
CYTHON_BUILD = Path("build/cython/guard/broker/proxy")


def _compiled_twins() -> list[Extension]:
    """connection.py, pump.py and names.py, compiled by Cython under the names
    _cconnection, _cpump and _cnames, each with the sha256 of the source it was built from
    (`SOURCE_SHA256`: proxy/core.py runs the reference instead of a twin built from an
    older source).
    Nothing without Cython; a module without its .pxd is not compiled."""
    try:
        from Cython.Build import cythonize
    except ImportError:  # the reference runs; pyproject.toml's build requires bring Cython
        return []
    CYTHON_BUILD.mkdir(parents=True, exist_ok=True)
    extensions = []
    compiled_names = (PROXY / "names.pxd").exists()
    for name, twin in (("connection", "_cconnection"), ("pump", "_cpump"), ("names", "_cnames")):
        if not (PROXY / f"{name}.pxd").exists():  # a source tree without it: the reference
            continue
        source = (PROXY / f"{name}.py").read_bytes()
        digest = hashlib.sha256(source).hexdigest()
        if name == "connection" and compiled_names:
            # The core's twin uses the name tables' twin (proxy/core.py runs neither when
            # either is stale); the reference keeps importing names.py.
            line = b"from guard.broker.proxy.names import "
            assert source.count(line) == 1, "connection.py imports names.py in one line"
            source = source.replace(line, b"from guard.broker.proxy._cnames import ")
        (CYTHON_BUILD / f"{twin}.py").write_bytes(
            source + b'\n\nSOURCE_SHA256 = "%s"\n' % digest.encode()
        )
        shutil.copyfile(PROXY / f"{name}.pxd", CYTHON_BUILD / f"{twin}.pxd")
        extensions.append(
            Extension(
                f"guard.broker.proxy.{twin}",
                sources=[str(CYTHON_BUILD / f"{twin}.py")],
                optional=True,
            )
        )
    return cythonize(
        extensions,
        build_dir="build/cython-c",
        # Where Cython finds the declarations by module name (the twin's .pxd beside it).
        include_path=["build/cython"],
        quiet=True,
        compiler_directives={
            "language_level": 3,
            # The reference's annotations are for mypy; as C types they would change what
            # the twin accepts (an `int` that may be None).
            "annotation_typing": False,
            "binding": False,
        },
    )


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
        # A TLS stream transport whose records C moves, with the OpenSSL `_ssl` loaded
        # (guard/broker/proxy/tlstransport.py); optional in the same way.
        Extension(
            "guard.broker.proxy._ctls",
            sources=["guard/broker/proxy/_ctls.c"],
            optional=True,
        ),
        # The normalized text of a plain statement with inlined values, without a parse
        # (guard/broker/sql/shape.py's literal_shape); optional in the same way.
        Extension(
            "guard.broker.sql._cshape",
            sources=["guard/broker/sql/_cshape.c"],
            optional=True,
        ),
        *_compiled_twins(),
    ]
)
