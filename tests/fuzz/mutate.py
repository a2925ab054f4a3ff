"""Hypothesis strategies that damage what fcpass reads: bytes, JSON documents and option values."""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import strategies as st

# Values of the wrong type or out of range, for any field.
ODD_SCALARS = st.sampled_from([None, True, False, 0, -1, 1, 2, 3, 10**12, -(10**12), 2**63, 0.5, -0.5, 1e-30, 1e308,
                               -1e308, math.nan, math.inf, -math.inf, "", "x", "0", "1e3", "nan", "-1", "null",
                               "\u00e9\u0000", [], [0], [None], {}, {"": 0}])
ODD_VALUES = st.one_of(
    ODD_SCALARS,
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(ODD_SCALARS, max_size=3),
    st.dictionaries(st.text(max_size=4), ODD_SCALARS, max_size=2),
)


@st.composite
def damaged_bytes(draw: st.DrawFn, data: bytes, other: bytes | None = None) -> bytes:
    """`data` truncated, with bits flipped, a run overwritten or spliced with a piece of `other`."""
    n = len(data)
    kind = draw(st.sampled_from(["truncate", "flip", "overwrite", "splice", "drop"]))
    if kind == "truncate":
        return data[: draw(st.integers(0, n - 1))]
    if kind == "flip":
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, n - 1))
            out[i] ^= 1 << draw(st.integers(0, 7))
        return bytes(out)
    if kind == "overwrite":
        i = draw(st.integers(0, n - 1))
        junk = draw(st.binary(min_size=1, max_size=64))
        return data[:i] + junk + data[i + len(junk):]
    if kind == "drop":
        i = draw(st.integers(0, n - 1))
        return data[:i] + data[i + draw(st.integers(1, 256)):]
    source = other or data
    i, j = draw(st.integers(0, n - 1)), draw(st.integers(0, len(source) - 1))
    return data[:i] + source[j: j + draw(st.integers(1, 4096))] + data[i:]


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value inside a JSON document."""
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


def _get(doc: Any, path: tuple) -> Any:
    for k in path:
        doc = doc[k]
    return doc


@st.composite
def damaged_json(draw: st.DrawFn, doc: Any, values: st.SearchStrategy = ODD_VALUES) -> Any:
    """A copy of `doc` with one to three values replaced by odd ones, keys dropped or added, or lists emptied."""
    doc = json.loads(json.dumps(doc))
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(doc)
        path = draw(st.sampled_from(paths))
        if not path:
            return draw(values)
        parent, key = _get(doc, path[:-1]), path[-1]
        kind = draw(st.sampled_from(["replace", "replace", "drop", "add", "duplicate"]))
        if kind == "replace":
            parent[key] = draw(values)
        elif kind == "drop":
            del parent[key]
        elif kind == "add" and isinstance(parent, dict):
            parent[draw(st.sampled_from(["extra", "version", "regions", "x"]))] = draw(values)
        elif kind == "duplicate" and isinstance(parent, list):
            parent.append(json.loads(json.dumps(parent[key])))
        elif isinstance(parent, list):
            parent.insert(key, draw(values))
    return doc


@st.composite
def damaged_text(draw: st.DrawFn, text: str) -> str:
    """JSON text cut short, a character changed, or a piece inserted."""
    n = len(text)
    kind = draw(st.sampled_from(["truncate", "change", "insert"]))
    i = draw(st.integers(0, max(n - 1, 0)))
    if kind == "truncate":
        return text[:i]
    piece = draw(st.sampled_from(['"', "{", "}", "[", "]", ",", ":", "\\", "NaN", "1e999", "\x00", "null", "-"]))
    return text[:i] + piece + text[i + (kind == "change"):]
