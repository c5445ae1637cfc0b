"""Command-line flags generated from dataclass fields: each setting's type, default and choices live in one place
(its dataclass), and every command that exposes the setting follows it."""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import MISSING, Field, fields


def field_default(f: Field):
    """A dataclass field's default, made by its default_factory where it has one (lists)."""
    return f.default_factory() if f.default_factory is not MISSING else f.default


def flag_spec(cls, name: str) -> dict:
    """``add_argument``'s keywords for field ``name`` of dataclass ``cls``: its type, default and choices
    (``field(metadata={"choices": ...})``). A bool field is a ``--x/--no-x`` pair (a ``None`` default: the run
    decides); a list field takes one or more values."""
    f = next(f for f in fields(cls) if f.name == name)
    typ, default = typing.get_type_hints(cls)[name], field_default(f)
    if typing.get_origin(typ) in (typing.Union, types.UnionType):  # X | None -> X
        typ, = (a for a in typing.get_args(typ) if a is not type(None))
    if typ is bool:
        return {"action": argparse.BooleanOptionalAction, "default": default}
    nargs = None
    if typing.get_origin(typ) is list:
        (typ,), nargs = typing.get_args(typ), "+"
    return {"type": typ, "nargs": nargs, "default": default, "choices": f.metadata.get("choices")}


def dataclass_flags(p: argparse.ArgumentParser, cls, helps: dict[str, str]) -> None:
    """One flag per field of ``cls`` named in ``helps`` (``batch_size`` -> ``--batch-size``), as ``flag_spec``."""
    for name, help in helps.items():
        spec = flag_spec(cls, name)
        if "default" not in help:  # a help that explains its default ("default: cuda when available") keeps its words
            help = f"{help} (default: {spec['default']})"
        p.add_argument("--" + name.replace("_", "-"), dest=name, help=help, **spec)


def dataclass_values(args: argparse.Namespace, helps: dict[str, str]) -> dict:
    """The parsed values of the flags ``dataclass_flags`` made from ``helps``, as keyword arguments."""
    return {name: getattr(args, name) for name in helps}
