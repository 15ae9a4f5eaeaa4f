"""Load a TOML file into a pydantic model, reporting errors by file, line and key.

``tomllib`` and pydantic both know *what* is wrong but not *where* in the file; a technician
editing ``edge.toml`` on a gateway needs ``edge.toml:14: devices[1].port: ...``. The locator
below maps a pydantic error location back to the line that defines it (or, for a missing key,
to the header of the table that should contain it).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from protocol.ids import NAME_PATTERN, NAME_RULE

M = TypeVar("M", bound=BaseModel)

_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"""^\s*("[^"]*"|'[^']*'|[A-Za-z0-9_.-]+)\s*=""")


class ConfigError(ValueError):
    """A configuration file that cannot be used. ``str()`` lists every problem, one per line."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__("\n".join(problems))


def _index_lines(text: str) -> dict[tuple[str | int, ...], int]:
    """Map key paths (e.g. ``("devices", 1, "port")``) to 1-based line numbers."""
    where: dict[tuple[str | int, ...], int] = {}
    counts: dict[tuple[str | int, ...], int] = {}
    table: tuple[str | int, ...] = ()
    for lineno, line in enumerate(text.splitlines(), start=1):
        h = _HEADER.match(line)
        if h:
            names = tuple(p.strip().strip("\"'") for p in h.group(2).split("."))
            if h.group(1) == "[[":
                n = counts.get(names, -1) + 1
                counts[names] = n
                table = (*names, n)
            else:
                table = names
            where.setdefault(table, lineno)
            continue
        k = _KEY.match(line)
        if k:
            key = tuple(p.strip().strip("\"'") for p in k.group(1).split("."))
            where.setdefault((*table, *key), lineno)
    return where


def _line_for(loc: tuple[str | int, ...], where: dict[tuple[str | int, ...], int]) -> int | None:
    # Walk up the path until something is found: a bad list item inside `key = [...]` reports
    # the key's line, a missing key reports its table's header.
    for n in range(len(loc), 0, -1):
        if loc[:n] in where:
            return where[loc[:n]]
    return None


def _data_loc(data: Any, loc: tuple[str | int, ...]) -> tuple[str | int, ...]:
    """Drop the parts of a pydantic error location that are not in the file: union tags
    (``devices.0.tcp.port``) and validator labels (``function-after[...]``)."""
    out: list[str | int] = []
    node = data
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(node, dict):
            if part in node:
                out.append(part)
                node = node[part]
            elif last and not (isinstance(part, str) and part in node.values()):
                out.append(part)  # a missing or extra key is the last element (not a union tag
                # such as the "threshold" of `type = "threshold"` on a model-level error)
            continue  # a label between two real keys
        if isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            out.append(part)
            node = node[part]
            continue
        if last and not (isinstance(part, str) and "[" in part):
            out.append(part)
    return tuple(out)


def _fmt_loc(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<top level>"


def load_toml(path: str | Path, model: type[M], overrides: dict[str, Any] | None = None) -> M:
    """Read ``path`` and validate it as ``model``; raise :class:`ConfigError` naming line and key."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(p), [f"{p}: cannot read: {exc.strerror or exc}"]) from None
    return parse_toml(text, model, source=str(p), overrides=overrides)


def parse_toml(text: str, model: type[M], source: str = "<string>",
               overrides: dict[str, Any] | None = None) -> M:
    """Like :func:`load_toml` for text already in memory."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message already ends with "(at line N, column M)".
        raise ConfigError(source, [f"{source}: TOML syntax error: {exc}"]) from None
    if overrides:
        data.update(overrides)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        where = _index_lines(text)
        problems = []
        for loc, msg in validation_problems(data, exc):
            line = _line_for(loc, where)
            pos = f"{source}:{line}" if line else source
            problems.append(f"{pos}: {_fmt_loc(loc)}: {msg}")
        raise ConfigError(source, problems) from None


def validation_problems(data: Any, exc: ValidationError) -> list[tuple[tuple[str | int, ...], str]]:
    """The errors of validating ``data`` as (key path in ``data``, readable message): union tags and
    validator labels removed from the path, names explained. For data that is not from a file (the
    remote configuration a gateway receives as JSON)."""
    out = []
    for err in exc.errors():
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "string_pattern_mismatch" and err.get("ctx", {}).get("pattern") == NAME_PATTERN:
            msg = f"{err['input']!r} is not a valid name: use {NAME_RULE}"
        out.append((_data_loc(data, tuple(err["loc"])), msg))
    return out


def format_loc(loc: tuple[str | int, ...]) -> str:
    """A key path as written in the docs and messages: ``devices[1].port``."""
    return _fmt_loc(loc)


def problem_at(path: str | Path, loc: tuple[str | int, ...], message: str) -> str:
    """Format a problem found after validation (e.g. a cross-file check) as ``file:line: key: msg``."""
    try:
        where = _index_lines(Path(path).read_text(encoding="utf-8"))
    except OSError:
        where = {}
    line = _line_for(loc, where)
    return f"{path}:{line}: {_fmt_loc(loc)}: {message}" if line else f"{path}: {_fmt_loc(loc)}: {message}"
