"""Client encodings: decode statement text exactly as PostgreSQL will read it.

Imports only the stdlib. The analyser must see the same characters the server converts the
client's bytes into, or a statement could be analysed as one thing and run as another.
Single-byte encodings and the ASCII-safe multibyte ones (UTF8, EUC_*) decode unambiguously.
The client-only multibyte encodings (SJIS, BIG5, GBK, UHC, GB18030, JOHAB) can hide an ASCII
quote or backslash inside a multibyte character — the classic analyser/server mismatch that
PostgreSQL itself avoids by refusing them as server encodings — so guard refuses them too.
"""

from __future__ import annotations

# PostgreSQL encoding name → Python codec.
_CODECS = {
    "UTF8": "utf-8",
    "UNICODE": "utf-8",
    "SQL_ASCII": "latin-1",  # no conversion: bytes pass as they are; latin-1 keeps them 1:1
    "LATIN1": "latin-1",
    "LATIN2": "iso8859-2",
    "LATIN3": "iso8859-3",
    "LATIN4": "iso8859-4",
    "LATIN5": "iso8859-9",
    "LATIN6": "iso8859-10",
    "LATIN7": "iso8859-13",
    "LATIN8": "iso8859-14",
    "LATIN9": "iso8859-15",
    "LATIN10": "iso8859-16",
    "ISO_8859_5": "iso8859-5",
    "ISO_8859_6": "iso8859-6",
    "ISO_8859_7": "iso8859-7",
    "ISO_8859_8": "iso8859-8",
    "WIN866": "cp866",
    "WIN874": "cp874",
    "WIN1250": "cp1250",
    "WIN1251": "cp1251",
    "WIN1252": "cp1252",
    "WIN1253": "cp1253",
    "WIN1254": "cp1254",
    "WIN1255": "cp1255",
    "WIN1256": "cp1256",
    "WIN1257": "cp1257",
    "WIN1258": "cp1258",
    "KOI8R": "koi8-r",
    "KOI8U": "koi8-u",
    "EUC_JP": "euc_jp",
    "EUC_KR": "euc_kr",
    "EUC_CN": "gb2312",
    "EUC_JIS_2004": "euc_jis_2004",
}

REFUSED = frozenset({"SJIS", "SHIFT_JIS_2004", "BIG5", "GBK", "UHC", "GB18030", "JOHAB"})


def codec_for(pg_name: str) -> str | None:
    """Python codec for a PostgreSQL client_encoding value; None if guard refuses it."""
    name = pg_name.strip().upper().replace("-", "_")
    if name in REFUSED:
        return None
    return _CODECS.get(name)


def decode_query(body: bytes, codec: str) -> str:
    """Text of a Query body (NUL-terminated) in the client's encoding."""
    end = body.find(b"\x00")
    if end != len(body) - 1:
        raise ValueError("Query text must end at its only NUL")
    return body[:end].decode(codec)


def decode_parse(body: bytes, codec: str) -> tuple[str, str]:
    """Statement name and text of a Parse body in the client's encoding."""
    end1 = body.find(b"\x00")
    end2 = body.find(b"\x00", end1 + 1) if end1 >= 0 else -1
    if end2 < 0:
        raise ValueError("Parse without NUL-terminated name and text")
    return body[:end1].decode(codec), body[end1 + 1 : end2].decode(codec)
