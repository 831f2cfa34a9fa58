"""CLI options generated from the typed specs (``artifacts.specs``).

``@with_specs(router=RouterSpec)`` on a command function whose parameter ``router`` is a
``RouterSpec`` replaces that parameter, for typer, by one option per field of the spec: the name
from the field (``index_dtype`` → ``--index-dtype``, or its one spelling in ``SPELLINGS``), the
choices from its ``Literal`` type, the default from the field's default, the help from its
description; a tuple field is a repeatable option. When the command runs, the options' values
become the spec (``RouterSpec(**values)``); a value the spec refuses (``--k 0``) is a usage
error naming the option (exit code 2) and the command body does not run. A new field on a spec
is a new option of every command that takes the spec, with no edit here or in ``flows.cli``.
"""

from __future__ import annotations

import inspect
import types
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import typer
from benchroute.artifacts.specs import Spec
from pydantic import ValidationError

# One spelling per concept: a field's option where it is not ``--field-name`` (the names the
# CLI has always used), and the hidden old spellings that still work.
SPELLINGS: dict[str, str] = {
    "sources": "--kind",
    "datasets": "--dataset",
    "models": "--model",
    "exclude_models": "--exclude-model",
    "pairs": "--pair",
    "stability_B": "--stability-B",
}
HIDDEN_ALIASES: dict[str, str] = {"sources": "--source"}
METAVARS: dict[str, str] = {
    "datasets": "NAME",
    "models": "NAME",
    "exclude_models": "NAME",
    "pairs": "STRONG,WEAK",
    "pair_models": "MODEL",
}
CTX = "_spec_ctx"  # the generated command's typer.Context parameter


def option_name(field_name: str) -> str:
    """The option that sets ``field_name`` of a spec: ``--k``, ``--index-dtype``, ``--kind``…"""
    return SPELLINGS.get(field_name, "--" + field_name.replace("_", "-"))


def _strip_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _choices(tp) -> tuple | None:
    return tuple(typing.get_args(tp)) if typing.get_origin(tp) is Literal else None


@dataclass(frozen=True)
class FieldOption:
    """One spec field as CLI option(s): ``param`` (and ``alias``, hidden) in the command's
    signature."""

    field: str
    param: str
    decl: str
    multiple: bool
    choices: tuple | None
    alias: str | None = None
    alias_decl: str | None = None

    def parameters(self, info, help_text: str | None) -> list[inspect.Parameter]:
        tp, optional = _strip_optional(info.annotation)
        metavar = METAVARS.get(self.field)
        callback = None
        if self.choices:  # a str checked by the callback: one message for single and repeated
            callback = check_choices(self.choices)
            metavar = metavar or "[" + "|".join(map(str, self.choices)) + "]"
        metavar = metavar or self.decl.lstrip("-").upper().replace("-", "_")
        if self.multiple:
            annotation, default = list[str] | None, None
        else:
            annotation = str if self.choices else _scalar(tp)
            if optional:
                annotation = annotation | None
            default = info.get_default(call_default_factory=True)
        decl = self.decl
        if annotation is bool:  # a switch both ways: the default may be either
            decl = f"{decl}/--no-{decl.removeprefix('--')}"
        kind = inspect.Parameter.KEYWORD_ONLY
        out = [inspect.Parameter(self.param, kind, default=default, annotation=Annotated[
            annotation, typer.Option(decl, help=help_text, metavar=metavar, callback=callback,
                                     show_default=not self.multiple)])]
        if self.alias:
            out.append(inspect.Parameter(self.alias, kind, default=None, annotation=Annotated[
                list[str] | None, typer.Option(self.alias_decl, hidden=True, callback=callback)]))
        return out

    def value(self, kwargs: dict) -> Any:
        """The field's value from the parsed options (popped), or ``None``: leave the default."""
        v = kwargs.pop(self.param)
        if self.alias:
            v = [*(v or []), *(kwargs.pop(self.alias) or [])]
        if self.multiple:
            return list(v) if v else None
        return v


def _scalar(tp):
    tp = typing.get_origin(tp) or tp
    if tp in (int, float, str, bool):
        return tp
    raise TypeError(f"no CLI option for a spec field of type {tp!r}")


def check_choices(choices: tuple):
    """A typer callback: every value given (one, or a repeated option's list) is one of ``choices``."""

    def check(value):
        for v in [value] if isinstance(value, str) else value or ():
            if v not in choices:
                raise typer.BadParameter(
                    f"{v!r} is not one of " + ", ".join(repr(c) for c in choices) + ".")
        return value

    return check


@dataclass(frozen=True)
class SpecOptions:
    """Which fields of ``spec`` are options (``only``/``exclude``), with per-command ``help``."""

    spec: type[Spec]
    only: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    help: dict[str, str] = field(default_factory=dict)

    def fields(self, prefix: str) -> list[FieldOption]:
        out = []
        for name, info in self.spec.model_fields.items():
            if (self.only is not None and name not in self.only) or name in self.exclude:
                continue
            tp, _ = _strip_optional(info.annotation)
            multiple = typing.get_origin(tp) in (tuple, list)
            choices = _choices(typing.get_args(tp)[0] if multiple else tp)
            alias = HIDDEN_ALIASES.get(name)
            out.append(FieldOption(name, f"{prefix}__{name}", option_name(name), multiple, choices,
                                   f"{prefix}__{name}__alias" if alias else None, alias))
        return out

    def build(self, values: dict, ctx) -> Spec:
        """The spec from the options' values; what it refuses is a usage error on the option."""
        try:
            return self.spec(**values)
        except ValidationError as exc:
            err = exc.errors()[0]
            name = err["loc"][0] if err["loc"] else None
            msg = str(err["msg"]).removeprefix("Value error, ")
            hint = f"'{option_name(name)}'" if isinstance(name, str) else None
            raise typer.BadParameter(msg, ctx=ctx, param_hint=hint) from None


def spec_options(spec: type[Spec], *, only=None, exclude=(), help=None) -> SpecOptions:
    return SpecOptions(spec, tuple(only) if only is not None else None, tuple(exclude), dict(help or {}))


def with_specs(**specs: type[Spec] | SpecOptions):
    """Decorator: each keyword names a parameter of the command function that takes a spec; for
    typer, the parameter becomes the spec's options (``SpecOptions``); the function gets the
    spec, built and validated, before its body runs."""
    specs = {k: v if isinstance(v, SpecOptions) else SpecOptions(v) for k, v in specs.items()}

    def decorate(func):
        sig = inspect.signature(func)  # the spec parameters' annotations are not needed: not evaluated
        missing = set(specs) - set(sig.parameters)
        if missing:
            raise TypeError(f"{func.__name__} has no parameter {sorted(missing)}")
        params, generated = [], {}
        for p in sig.parameters.values():
            if p.name not in specs:
                a = p.annotation
                a = eval(a, func.__globals__) if isinstance(a, str) else a  # noqa: S307 - source text
                params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=a))
                continue
            opts = specs[p.name]
            fields = opts.fields(p.name)
            generated[p.name] = (opts, fields)
            for f in fields:
                params.extend(f.parameters(opts.spec.model_fields[f.field],
                                           opts.help.get(f.field, opts.spec.model_fields[f.field].description)))
        params.append(inspect.Parameter(CTX, inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context))

        def command(**kwargs):
            ctx = kwargs.pop(CTX)
            for name, (opts, fields) in generated.items():
                values = {f.field: v for f in fields if (v := f.value(kwargs)) is not None}
                kwargs[name] = opts.build(values, ctx)
            return func(**kwargs)

        command.__signature__ = inspect.Signature(params)
        command.__name__, command.__qualname__ = func.__name__, func.__qualname__
        command.__doc__, command.__module__ = func.__doc__, func.__module__
        command.__annotations__ = {}
        command.spec_fields = {name: [f.field for f in fields] for name, (_, fields) in generated.items()}
        return command

    return decorate
