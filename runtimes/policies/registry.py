"""The policy registry: every family by name, its config, and policies built from a spec
(`fastcache:alpha=0.1,regions=stack`). The one module that imports every family."""

from __future__ import annotations

import json
import logging
import math
import typing
from dataclasses import asdict
from typing import Any

from fcpass.contract.errors import FcpassError
from runtimes.policies.core import (
    DeltaDiT,
    DeltaDiTConfig,
    FastCache,
    FastCacheConfig,
    FBCache,
    FBCacheConfig,
    Fora,
    ForaConfig,
    MagCache,
    MagCacheConfig,
    NoCache,
    Policy,
    TaylorSeer,
    TaylorSeerConfig,
    TeaCache,
    TeaCacheConfig,
)
from runtimes.policies.tokens import DuCa, DuCaConfig, ToCa, ToCaConfig

log = logging.getLogger(__name__)

POLICIES: dict[str, type[Policy]] = {
    "none": NoCache, "fora": Fora, "fastcache": FastCache, "taylorseer": TaylorSeer, "delta-dit": DeltaDiT,
    "fbcache": FBCache, "teacache": TeaCache, "magcache": MagCache, "duca": DuCa, "toca": ToCa,
}
CONFIGS: dict[str, type] = {
    "fora": ForaConfig, "fastcache": FastCacheConfig, "taylorseer": TaylorSeerConfig, "delta-dit": DeltaDiTConfig,
    "fbcache": FBCacheConfig, "teacache": TeaCacheConfig, "magcache": MagCacheConfig, "duca": DuCaConfig,
    "toca": ToCaConfig,
}


def policy_defaults() -> dict[str, dict[str, object]]:
    """Every policy's default settings, as the cache plan records them."""
    return {name: asdict(cls()) for name, cls in CONFIGS.items()}


# Option names that specs, flags and cache plans written before a rename still use -> the name now.
RENAMED_OPTIONS = {"level": "regions", "levels": "regions"}
_warned: set[str] = set()  # the old names already warned about in this process (one warning each)


def current_option_names(options: dict[str, Any]) -> dict[str, Any]:
    """`options` with each renamed option under its current name (order kept), logging one deprecation
    warning per old name; an option given under both names keeps the current name's value."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        new = RENAMED_OPTIONS.get(key, key)
        if new != key and value is not None and key not in _warned:
            _warned.add(key)
            log.warning("policy option %s= is deprecated: it is now %s= (%s=%s)", key, new, new, value)
        if (new == key and value is not None) or (out.get(new) is None and options.get(new) is None):
            out[new] = value
    return out


def parse_policy_spec(text: str) -> tuple[str, dict[str, Any]]:
    """`fastcache:alpha=0.1,regions=stack,blocks` -> ("fastcache", {"alpha": 0.1, "regions": "stack,blocks"}).

    Values are JSON where they parse (numbers, lists), else strings; a bare word continues the
    previous value, so comma-separated values need no quoting. Renamed options (`RENAMED_OPTIONS`)
    come back under their current names.
    """
    name, _, rest = text.partition(":")
    options: dict[str, Any] = {}
    items: list[str] = []
    for piece in filter(None, rest.split(",")):
        if "=" in piece or not items:
            items.append(piece)
        else:
            items[-1] += "," + piece
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            raise FcpassError(f"policy option {item!r} in {text!r} needs a value; write it as KEY=VALUE")
        try:
            options[key.strip().replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip().replace("-", "_")] = value
    return name.strip(), current_option_names(options)


def make_policy(name: str, **options: object) -> Policy:
    """Build a policy from its name, or a spec `name:key=value,...`, and keyword options matching its
    config's fields (None = default; the spec's values win over the keywords)."""
    name, spec_options = parse_policy_spec(name)
    if name not in POLICIES:
        raise FcpassError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    cls = POLICIES[name]
    given = {k: v for k, v in {**current_option_names(options), **spec_options}.items() if v is not None}
    config_cls = CONFIGS.get(name)
    fields = config_cls.__dataclass_fields__ if config_cls is not None else {}
    unknown = sorted(set(given) - set(fields))
    if unknown:
        shown = ", ".join(k if k.isidentifier() else repr(k) for k in unknown)  # a key with a newline stays on the line
        raise FcpassError(f"{name} has no option {shown}; its options are: {', '.join(fields) or 'none'}")
    if config_cls is None:
        return cls()
    hints = typing.get_type_hints(config_cls)
    typed = {key: _as_field_type(name, key, value, hints[key], fields[key].default) for key, value in given.items()}
    return cls(config_cls(**typed))  # type: ignore[call-arg]


_WHAT = {bool: ("0 or 1", 1), int: ("a whole number >= 0", 3), float: ("a finite number", 0.1), str: ("a word", "name")}


def _as_field_type(policy: str, key: str, value: Any, hint: Any, default: Any) -> Any:
    """A policy option as its config field's type (a spec's values are JSON or bare words), or one
    line naming the option, what it must be and an example."""
    kind = next(t for t in typing.get_args(hint) or (hint,) if t is not type(None))  # `int | None` -> int
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if typing.get_origin(kind) is tuple:
        if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return tuple(float(v) for v in value)
        what, example = "a list of numbers", "[1.0,0.0]"
    else:
        if kind is bool and (isinstance(value, bool) or value in (0, 1)):
            return bool(value)
        # Every whole-number option counts something (steps, blocks, a seed): none is negative.
        if kind is int and number and math.isfinite(value) and float(value).is_integer() and value >= 0:
            return int(value)
        if kind is float and number and math.isfinite(value):
            return float(value)
        if kind is str and isinstance(value, str):
            return value
        what, example = _WHAT[kind]
    example = default if isinstance(default, (int, float, str)) and not isinstance(default, bool) else example
    raise FcpassError(f"{policy} option {key}={value!r} is not {what}; pass e.g. {key}={example}")

