"""Command-line options and the typed config: one source of defaults.

Every option of every command is either derived from a config field (common/options.py) and then
agrees with it in name, default, type, bounds, choices and environment variable, or it is one of
the few listed options that configure no field (--config, --out, --resume, ...). A hand-written
option that repeats a field is caught here.
"""

from __future__ import annotations

import dataclasses
import typing

import click
import pytest
from click.testing import CliRunner

from geotrain.common import config as C
from geotrain.common.options import AutoInt, ConfigOption, config_from_params, config_options, make_option

# (command path, option name) of the options that set no config field
NOT_CONFIG = {
    ("coordinator", "config"), ("train", "out"), ("train", "config_file"), ("train", "resume"),
    ("train", "progress"), ("health", "service"), ("health", "timeout"), ("plot", "out"),
    ("train", "recipe"),  # picks a set of defaults below the file and the flags; not a setting itself
    # HellaSwag scoring: --hellaswag takes an optional value (a file, or none: the public split)
    ("eval", "hellaswag"), ("eval", "limit"), ("eval", "progress"),
}
# commands whose options set no config at all (their inputs are files, not a run's settings)
NOT_CONFIG_COMMANDS = {"prepare", "export", "plan"}  # plan: a calculator over hypothetical hosts


def commands() -> dict[str, click.Command]:
    from geotrain.cli import cli
    from geotrain.coordinator.cli import main as coordinator
    from geotrain.worker.cli import main as worker

    found = {"coordinator": coordinator, "worker": worker}
    found.update(cli.commands)
    return found


def field_at(root: type, key: str) -> tuple[type, dataclasses.Field]:
    """Walks the dataclasses itself (not common/options.py's resolver)."""
    owner = root
    *parents, leaf = key.split(".")
    for part in parents:
        owner = type(getattr(owner(), part))  # only RunConfig has sections
    (f,) = [f for f in dataclasses.fields(owner) if f.name == leaf]
    return owner, f


def expected_default_text(f: dataclasses.Field) -> str | None:
    meta = f.metadata["cli"]
    if f.default is dataclasses.MISSING or f.default is None:
        return None
    if meta.auto and f.default == 0:
        return meta.auto
    if isinstance(f.default, bool):
        return ("--" if f.default else "--no-") + f.name.replace("_", "-")
    if isinstance(f.default, str) and f.default in ("", "\n"):
        return repr(f.default)
    return str(f.default)


def problems_of(name: str, command: click.Command, all_fields: set[str]) -> list[str]:
    """What disagrees between the command's options and the config fields."""
    bad = []
    for p in command.params:
        if not isinstance(p, click.Option) or p.name == "help":
            continue
        where = f"{name} {p.opts[0]}"
        if not isinstance(p, ConfigOption):
            if (name, p.name) in NOT_CONFIG or name in NOT_CONFIG_COMMANDS:
                continue
            if p.name in all_fields:
                bad.append(f"{where}: repeats the config field {p.name!r}; derive it with config_options")
            else:
                bad.append(f"{where}: no config field (declare it with opt() in common/config.py)")
            continue
        owner, f = field_at(p.config_root, p.config_key)
        meta = f.metadata["cli"]
        flag = meta.flag or "--" + f.name.replace("_", "-")
        if flag not in p.opts:
            bad.append(f"{where}: flag is not {flag}")
        if p.envvar != "GEOTRAIN_" + flag[2:].upper().replace("-", "_"):
            bad.append(f"{where}: environment variable {p.envvar!r}")
        if p.default is not None:
            bad.append(f"{where}: default {p.default!r} would override the TOML file (must be None)")
        shown = p.show_default if isinstance(p.show_default, str) else None
        if shown != expected_default_text(f):
            bad.append(f"{where}: shows default {shown!r}, the field's is {f.default!r}")
        hint = typing.get_type_hints(owner)[f.name]
        py = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
        kinds = {int: (click.types.IntParamType, AutoInt), float: (click.types.FloatParamType,),
                 str: (click.types.StringParamType, click.Path, click.Choice), bool: (click.types.BoolParamType,)}
        if not isinstance(p.type, kinds[py]) or (py is bool) != p.is_flag:
            bad.append(f"{where}: type {p.type!r} for a field of type {py.__name__}")
        choices = tuple(getattr(p.type, "choices", ())) or None
        if choices != (tuple(str(c) for c in meta.choices) if meta.choices is not None else None):
            bad.append(f"{where}: choices {choices} != the field's {meta.choices}")
        if f.default not in (dataclasses.MISSING, None) and not isinstance(f.default, bool):
            try:
                p.type.convert(f.default, p, None)
            except click.BadParameter as exc:
                bad.append(f"{where}: the field's default {f.default!r} is refused by the option: {exc}")
    return bad


def every_field_name() -> set[str]:
    names: set[str] = set()
    for cls in (C.RunConfig, C.WorkerConfig, C.CoordinatorConfig, C.DemoConfig, C.SampleConfig,
                C.EvalCheckpointConfig, C.StatusConfig):
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            if dataclasses.is_dataclass(default):
                names |= {g.name for g in dataclasses.fields(default)}
            names.add(f.name)
    return names


def test_every_option_agrees_with_its_config_field():
    found = commands()
    assert {"coordinator", "worker", "train", "sample", "eval", "demo", "status"} <= set(found)
    names = every_field_name()
    bad = [problem for name, command in found.items() for problem in problems_of(name, command, names)]
    assert bad == []
    derived = sum(isinstance(p, ConfigOption) for c in found.values() for p in c.params)
    assert derived >= 80


def test_a_hand_written_option_that_repeats_a_field_is_caught():
    @click.command()
    @click.option("--round-steps", default=40, type=int)
    @click.option("--metrics-port", type=int)
    def old_style(**params):
        pass

    bad = problems_of("coordinator", old_style, every_field_name())
    assert len(bad) == 2 and all("repeats the config field" in b for b in bad), bad


def test_a_derived_option_that_drifted_is_caught():
    """The check compares against the field, not against what the option says of itself."""
    option = make_option(C.RunConfig, "outer.lr")
    option.show_default = "0.7"
    option.type = click.INT

    @click.command()
    def drifted():
        pass

    drifted.params.append(option)
    bad = problems_of("coordinator", drifted, every_field_name())
    assert any("shows default '0.7'" in b for b in bad) and any("type" in b for b in bad), bad


def test_make_option_refuses_unknown_and_undeclared_fields():
    with pytest.raises(ValueError, match="no field 'optim.nope'"):
        make_option(C.RunConfig, "optim.nope")
    with pytest.raises(ValueError, match="no section 'optimizer'"):
        make_option(C.RunConfig, "optimizer.lr")
    with pytest.raises(ValueError, match="MergeConfig.max_staleness has no command-line metadata"):
        make_option(C.RunConfig, "merge.max_staleness")


# --------------------------------------------------------------------------- precedence


def coordinator_run(args: list[str]) -> C.RunConfig:
    from geotrain.coordinator.cli import build_run_config, main

    ctx = main.make_context("coordinator", list(args))
    return build_run_config(ctx.params["config"], ctx.params, command=main)


def test_precedence_flag_then_environment_then_file_then_default(tmp_path, monkeypatch):
    for name in ("GEOTRAIN_ROUND_STEPS", "GEOTRAIN_OUTER_LR", "GEOTRAIN_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    toml = tmp_path / "run.toml"
    toml.write_text("[round]\nsteps = 7\n[outer]\nlr = 0.5\n")
    assert coordinator_run([]).round.steps == C.RoundConfig().steps == 32  # default
    run = coordinator_run(["--config", str(toml)])
    assert (run.round.steps, run.outer.lr) == (7, 0.5)  # file over default
    monkeypatch.setenv("GEOTRAIN_ROUND_STEPS", "9")
    run = coordinator_run(["--config", str(toml)])
    assert (run.round.steps, run.outer.lr) == (9, 0.5)  # environment over file; the file's other keys stay
    run = coordinator_run(["--config", str(toml), "--round-steps", "11"])
    assert run.round.steps == 11  # flag over environment
    monkeypatch.setenv("GEOTRAIN_CONFIG", str(toml))
    assert coordinator_run([]).outer.lr == 0.5  # the file itself from the environment


def test_round_seconds_alone_makes_the_round_time_based(monkeypatch):
    monkeypatch.delenv("GEOTRAIN_ROUND_STEPS", raising=False)
    run = coordinator_run(["--round-seconds", "4"])
    assert (run.round.steps, run.round.seconds) == (0, 4.0)


def test_bool_option_from_environment_and_negated_flag(tmp_path, monkeypatch):
    from geotrain.cli import cli

    train = cli.commands["train"]
    toml = tmp_path / "run.toml"
    toml.write_text("[train]\ncompile = true\n")
    base = C.load_run_config(toml)
    ctx = train.make_context("train", ["--out", str(tmp_path), "--config", str(toml)])
    assert config_from_params(C.RunConfig, ctx.params, base=base, command=train).train.compile is True
    ctx = train.make_context("train", ["--out", str(tmp_path), "--no-compile"])
    assert config_from_params(C.RunConfig, ctx.params, base=C.load_run_config(toml), command=train).train.compile is False
    monkeypatch.setenv("GEOTRAIN_COMPILE", "false")
    ctx = train.make_context("train", ["--out", str(tmp_path)])
    assert config_from_params(C.RunConfig, ctx.params, base=C.load_run_config(toml), command=train).train.compile is False


def test_worker_defaults_are_the_dataclass_defaults(monkeypatch):
    from geotrain.worker.cli import main, worker_config

    for name in ("GEOTRAIN_PORT", "GEOTRAIN_METRICS_PORT", "GEOTRAIN_BATCH_SIZE", "GEOTRAIN_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    ctx = main.make_context("worker", ["--coordinator", "example.org:50051"])
    config = worker_config(ctx.params, command=main)
    assert config == C.WorkerConfig(coordinator="example.org:50051")
    assert (config.port, config.metrics_port, config.batch_size) == (C.WORKER_PORT, C.WORKER_METRICS_PORT, 0)
    monkeypatch.setenv("GEOTRAIN_BATCH_SIZE", "auto")
    monkeypatch.setenv("GEOTRAIN_METRICS_PORT", "0")
    ctx = main.make_context("worker", ["--coordinator", "[::1]:7", "--batch-size", "16"])
    config = worker_config(ctx.params, command=main)
    assert (config.coordinator, config.batch_size, config.metrics_port) == ("[::1]:7", 16, 0)


def test_config_from_params_needs_required_fields():
    @click.command()
    @config_options(C.WorkerConfig, ["port"])
    def cmd(**params):
        pass

    ctx = cmd.make_context("cmd", ["--port", "5"])
    with pytest.raises(TypeError, match="coordinator"):
        config_from_params(C.WorkerConfig, ctx.params, command=cmd)


# --------------------------------------------------------------------------- user mistakes


@pytest.mark.parametrize(
    "toml, flags, message",
    [
        ("[train]\ngrad_accum = 4\n", [], "train.grad_accum = 4: workers step once per batch"),
        ("[train]\ncompile = true\n", [], "train.compile = true: workers train eagerly"),
        ("", ["--sync-warmup", "1.5"], "sync.compression_warmup must be a fraction in (0, 1) or whole steps"),
        ("[sync]\nwarmup_compression = \"int4\"\n", [], "sync.warmup_compression must be 'int8' or 'none'"),
        ("", ["--model", "gpt5"], "unknown model preset 'gpt5'"),
    ],
)
def test_coordinator_refuses_bad_config_in_one_line(tmp_path, monkeypatch, toml, flags, message):
    from geotrain.coordinator.cli import main

    monkeypatch.delenv("GEOTRAIN_CONFIG", raising=False)
    path = tmp_path / "run.toml"
    path.write_text(toml)
    result = CliRunner().invoke(main, ["--config", str(path), "--run-dir", str(tmp_path / "run"), *flags])
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and result.output.startswith("error: ") and message in result.output
    assert not (tmp_path / "run").exists()


def test_worker_refuses_a_bad_name_in_one_line():
    from geotrain.worker.cli import main

    result = CliRunner().invoke(main, ["--coordinator", "h:1", "--name", "a b"])
    assert result.exit_code == 2 and result.output == "error: --name must match [A-Za-z0-9._-]{1,64}, got 'a b'\n"


def test_sync_section_warmup_forms():
    assert C.SyncConfig().validate().warmup() == 0.25
    assert C.SyncConfig(compression_warmup=40.0).validate().warmup() == 40
    assert isinstance(C.SyncConfig(compression_warmup=40.0).warmup(), int)  # whole steps, not a fraction
    for bad in (0.0, 1.5, -1.0):
        with pytest.raises(ValueError, match=repr(bad)):
            C.SyncConfig(compression_warmup=bad).validate()


def test_sync_trainer_defaults_are_the_optim_config():
    import inspect

    from geotrain.worker.sync import DEFAULT_WARMUP_FRACTION, SyncGroupTrainer

    sig = inspect.signature(SyncGroupTrainer.__init__).parameters
    o = C.OptimConfig()
    assert (sig["lr"].default, sig["weight_decay"].default, sig["betas"].default, sig["grad_clip"].default) == (
        o.lr, o.weight_decay, (o.beta1, o.beta2), o.grad_clip)
    assert DEFAULT_WARMUP_FRACTION == C.SyncConfig().compression_warmup


def test_every_command_help_lists_its_variables():
    for name, command in commands().items():
        result = CliRunner().invoke(command, ["--help"], prog_name=name, terminal_width=400)
        assert result.exit_code == 0, (name, result.output)
        for p in command.params:
            if isinstance(p, ConfigOption) and not p.hidden:
                assert p.envvar in result.output, (name, p.envvar)


def test_demo_refuses_a_missing_config_file_in_one_line(tmp_path):
    from geotrain.cli import cli

    result = CliRunner().invoke(cli, ["demo", "--config", str(tmp_path / "nope.toml"), "--run-dir", str(tmp_path / "d")])
    assert result.exit_code == 2 and result.output == f"error: config file not found: {tmp_path / 'nope.toml'}\n"


def test_the_sync_section_reaches_the_group_trainer():
    """[sync] and [optim] of the run config, as a coordinator's flags set them, are what a sync
    group's trainer runs with (warmup steps and scheme, optimizer, schedule)."""
    from geotrain.common.model import GPT
    from geotrain.worker.allreduce import CompressedAllReduce
    from geotrain.worker.group_runner import sync_trainer_settings
    from geotrain.worker.sync import SyncGroupTrainer

    run = coordinator_run(["--sync-warmup", "40", "--sync-warmup-compression", "none", "--max-iters", "400",
                           "--round-steps", "7"])
    run.optim.lr = 2e-3
    settings = sync_trainer_settings(run)
    assert settings["check_every"] == 7 and settings["lr"] == 2e-3 and settings["total_steps"] == 400
    model = GPT(C.model_config("nano", n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64))
    with CompressedAllReduce(0, 1, ["127.0.0.1:1"], compression="sign") as solo:
        trainer = SyncGroupTrainer(model, solo, **settings)
        assert (trainer.warmup_steps, trainer.warmup_compression) == (40, "none")
        run.sync = C.SyncConfig()  # the default: a quarter of max_iters, at int8
        trainer = SyncGroupTrainer(model, solo, **sync_trainer_settings(run))
        assert (trainer.warmup_steps, trainer.warmup_compression) == (100, "int8")
