"""Click options derived from the config dataclasses (common/config.py), so a default, type, help
text, choice list or environment name exists once.

A command names the dotted keys it exposes::

    @click.command()
    @config_options(RunConfig, ["model.preset", "optim.lr"])      # --model, --lr
    def main(**params):
        run = load_run_config(path)                                # TOML file or defaults
        config_from_params(RunConfig, params, base=run)            # flags and GEOTRAIN_* on top

Every derived option has default None: click then resolves command line > environment (the
variable GEOTRAIN_<FLAG>, e.g. GEOTRAIN_ROUND_STEPS for --round-steps), and only the values given
either way replace the base (the TOML file, or the dataclass defaults). --help shows the field's
default. A bool field becomes a `--x/--no-x` pair.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Callable, Iterable, Mapping

import click

from geotrain.common.config import CliMeta, apply_overrides

ENV_PREFIX = "GEOTRAIN_"


class ConfigOption(click.Option):
    """A click option bound to the field `config_key` (dotted) of the dataclass `config_root`."""

    def __init__(self, *args: Any, config_root: type, config_key: str, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.config_root = config_root
        self.config_key = config_key


class AutoInt(click.ParamType):
    """An integer >= low, or `word` (e.g. "auto") for the field's 0."""

    name = "integer"

    def __init__(self, word: str, low: int = 1):
        self.word = word
        self.low = low

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return f"[{self.word}|INTEGER]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            n = value
        elif str(value).strip().lower() == self.word:
            return 0
        else:
            try:
                n = int(str(value))
            except ValueError:
                self.fail(f"expected {self.word!r} or an integer >= {self.low}, got {value!r}", param, ctx)
        if n == 0:
            return 0
        if n < self.low:
            self.fail(f"expected {self.word!r} or an integer >= {self.low}, got {value!r}", param, ctx)
        return n


def resolve_field(root: type, key: str) -> tuple[type, dataclasses.Field]:
    """(the dataclass that declares it, the field) of dotted `key` under `root`; ValueError if none."""
    owner = root
    *parents, leaf = key.split(".")
    for part in parents:
        section = {f.name: f for f in dataclasses.fields(owner)}.get(part)
        if section is None or section.default_factory is dataclasses.MISSING:
            raise ValueError(f"{root.__name__} has no section {part!r} (in {key!r})")
        owner = section.default_factory  # the section's dataclass
    found = {f.name: f for f in dataclasses.fields(owner)}.get(leaf)
    if found is None:
        raise ValueError(f"{root.__name__} has no field {key!r}")
    return owner, found


def field_type(owner: type, f: dataclasses.Field) -> tuple[type, bool]:
    """(int | float | str | bool | bytes, optional) of a field's annotation."""
    hint = typing.get_type_hints(owner)[f.name]
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return inner, True
    return hint, False


def cli_meta(f: dataclasses.Field) -> CliMeta | None:
    return f.metadata.get("cli")


def flag_name(f: dataclasses.Field) -> str:
    meta = cli_meta(f)
    return (meta.flag if meta and meta.flag else "--" + f.name.replace("_", "-"))


def envvar_name(flag: str) -> str:
    """--round-steps -> GEOTRAIN_ROUND_STEPS."""
    return ENV_PREFIX + flag.lstrip("-").upper().replace("-", "_")


def param_name(key: str) -> str:
    """The Python name of the option's value in the command's params: optim.lr -> optim__lr."""
    return key.replace(".", "__")


def default_text(f: dataclasses.Field, meta: CliMeta) -> str | None:
    """What --help shows as the default (None: nothing, e.g. a default of None)."""
    if f.default is dataclasses.MISSING or f.default is None:
        return None
    if meta.auto and f.default == 0:
        return meta.auto
    if isinstance(f.default, bool):
        return "--" + ("" if f.default else "no-") + f.name.replace("_", "-")
    if isinstance(f.default, str):
        return repr(f.default) if f.default in ("", "\n") else f.default
    return str(f.default)


def click_type(owner: type, f: dataclasses.Field) -> click.ParamType:
    """The click type of a field: its annotation narrowed by the metadata (choices, bounds, auto)."""
    meta = cli_meta(f)
    py, _ = field_type(owner, f)
    if meta.choices is not None:
        return click.Choice([str(c) for c in meta.choices], case_sensitive=meta.case_sensitive)
    if meta.auto:
        return AutoInt(meta.auto, int(meta.low) if meta.low is not None else 1)
    if py is int:
        if meta.low is None and meta.high is None:
            return click.INT
        low = None if meta.low is None else int(meta.low)
        return click.IntRange(low, None if meta.high is None else int(meta.high), min_open=meta.low_open)
    if py is float:
        if meta.low is None and meta.high is None:
            return click.FLOAT
        return click.FloatRange(meta.low, meta.high, min_open=meta.low_open)
    if py is str:
        return click.Path(dir_okay=False) if meta.path else click.STRING
    raise TypeError(f"field {owner.__name__}.{f.name} of type {py!r} cannot be a command-line option")


def make_option(root: type, key: str) -> ConfigOption:
    """The click option of dotted field `key` of dataclass `root` (the field must use `opt(...)`)."""
    owner, f = resolve_field(root, key)
    meta = cli_meta(f)
    if meta is None:
        raise ValueError(f"{owner.__name__}.{f.name} has no command-line metadata: declare it with opt(...)")
    flag = flag_name(f)
    py, _ = field_type(owner, f)
    common: dict[str, Any] = dict(
        config_root=root, config_key=key, default=None, help=meta.help, hidden=meta.hidden,
        required=meta.required, envvar=envvar_name(flag), show_envvar=True, metavar=meta.metavar,
    )
    shown = default_text(f, meta)
    if shown is not None:
        common["show_default"] = shown
    if py is bool:
        negative = "--no-" + flag[2:]
        return ConfigOption([f"{flag}/{negative}", param_name(key)], is_flag=True, **common)
    return ConfigOption([flag, param_name(key)], type=click_type(owner, f), **common)


def config_options(root: type, keys: Iterable[str]) -> Callable[[Callable], Callable]:
    """Decorator: add the options of `keys` (dotted fields of `root`) to a click command, in order."""
    options = [make_option(root, key) for key in keys]

    def decorate(fn: Callable) -> Callable:
        params = getattr(fn, "__click_params__", None)
        if params is None:
            params = fn.__click_params__ = []
        # click reverses __click_params__ (decorators apply bottom-up): keep `keys` order in --help
        params.extend(reversed(options))
        return fn

    return decorate


def config_values(root: type, params: Mapping[str, Any], command: click.Command | None = None) -> dict[str, Any]:
    """{dotted key: value} of the options of `root` that were given (flag or environment)."""
    if command is None:
        command = click.get_current_context().command
    return {p.config_key: params[p.name] for p in command.params
            if isinstance(p, ConfigOption) and p.config_root is root and params.get(p.name) is not None}


def config_from_params(root: type, params: Mapping[str, Any], base: Any = None,
                       command: click.Command | None = None) -> Any:
    """`base` (default: `root()` built from the given flat values, so required fields may come from
    flags) with the given options of `root` applied on top. ValueError for a bad value."""
    values = config_values(root, params, command)
    if base is None:
        flat = {k: v for k, v in values.items() if "." not in k}
        base = root(**flat)
        values = {k: v for k, v in values.items() if "." in k}
    return apply_overrides(base, values)
