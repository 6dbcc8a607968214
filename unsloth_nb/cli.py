"""Command-line flags generated from the settings dataclasses, so that the command line can change every setting a
notebook can: one flag per field (``max_steps`` -> ``--max-steps``), its help the field's docstring, its type
the field's annotation. Flags left out keep the dataclass's own defaults (or a preset's)."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
from collections.abc import Callable
from typing import Any

from unsloth_nb.errors import UserError


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (``field: int = 1`` then ``\"\"\"What it is.\"\"\"``)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _parser_for(annotation: str, name: str) -> tuple[Callable[[str], Any] | None, str]:
    """(argparse type, metavar) for a field annotation written as a string (``int | None``, ``tuple[str, ...]``)."""
    kinds = {part.strip() for part in annotation.split("|")} - {"None"}
    if kinds == {"bool"}:
        return None, ""
    if kinds == {"int"}:
        return int, "N"
    if kinds == {"float"}:
        return float, "X"
    if kinds == {"str"}:
        return str, name.upper()
    if kinds == {"tuple[str, ...]"}:
        return lambda text: tuple(p.strip() for p in text.split(",") if p.strip()), "A,B,..."
    raise TypeError(f"no command-line form for {annotation!r}")


def add_arguments(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = (),
                  types: dict[str, Callable[[str], Any]] | None = None) -> None:
    """One ``--flag`` per field of the dataclass ``cls`` (except ``skip``); ``types`` overrides a field's parser
    (e.g. sizes written as "5GB"). Booleans get ``--flag`` / ``--no-flag``."""
    docs = field_docs(cls)
    group = parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip().splitlines()[0])
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        shown = ",".join(default) if isinstance(default, tuple) else default
        help_text = f"{docs.get(f.name, '')} (default: {shown})".replace("%", "%%")
        convert, metavar = _parser_for(str(f.type), f.name)
        if types and f.name in types:
            convert = types[f.name]
        if convert is None:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help_text)
        else:
            group.add_argument(flag, dest=f.name, type=convert, metavar=metavar, default=argparse.SUPPRESS,
                               help=help_text)


def from_arguments(cls: type, args: argparse.Namespace, base: Any = None) -> Any:
    """An instance of ``cls``: ``base`` (or the defaults) with the fields given on the command line."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    try:
        return dataclasses.replace(base if base is not None else cls(), **given)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{exc}. Fix: check the values given on the command line (--help lists them).") from None
