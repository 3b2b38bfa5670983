"""An async run's defaults (compressed in both directions) and the step throttle behind
`worker --speed` / `geotrain demo --speeds` (worker/throttle.py)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from geotrain.common.config import CompressionConfig, RunConfig
from geotrain.worker.throttle import parse_speeds, stretch_step


# --------------------------------------------------------------------------- defaults


def test_an_async_run_compresses_both_directions_by_default():
    run = RunConfig().validate()
    c = run.compression
    assert c.scheme == "tsign"  # 1 bit per value and one scale per tensor up
    assert c.downlink == "count"  # "auto" resolved: per-value counts down, replayed bit-identically
    assert c.last_scheme == "int4"
    assert run.round.steps == 32


def test_uncompressed_runs_stay_available_and_relay_their_deltas():
    for scheme in ("none", "sign", "int8"):
        c = CompressionConfig(scheme=scheme).validate()
        assert c.downlink == "relay", scheme  # "auto" gives count only to tsign
    # a downlink asked for by name is kept, and count still needs tsign
    assert CompressionConfig(scheme="sign", downlink="recode").validate().downlink == "recode"
    with pytest.raises(ValueError, match="'none'"):
        CompressionConfig(scheme="none", downlink="count").validate()


def test_the_coordinator_cli_defaults_and_compression_none():
    """The flags reach the run spec: no flag gives tsign + count, --compression none gives relay."""
    from geotrain.coordinator.cli import build_run_config, main

    def run_for(args: list[str]) -> RunConfig:
        ctx = main.make_context("coordinator", args)
        return build_run_config(None, ctx.params, command=main)

    default = run_for([])
    assert (default.compression.scheme, default.compression.downlink) == ("tsign", "count")
    none = run_for(["--compression", "none"])
    assert (none.compression.scheme, none.compression.downlink) == ("none", "relay")
    with pytest.raises(ValueError, match="count"):
        run_for(["--compression", "sign", "--downlink", "count"])


def test_a_run_file_choosing_a_scheme_gets_its_downlink(tmp_path):
    from geotrain.common.config import load_run_config

    toml = tmp_path / "run.toml"
    toml.write_text('[compression]\nscheme = "none"\n')
    run = load_run_config(toml)
    run.compression.scheme = "int8"  # a flag may still change it: nothing is resolved yet
    assert run.validate().compression.downlink == "relay"
    toml.write_text('[round]\nsteps = 20\n')
    assert load_run_config(toml).validate().compression.downlink == "count"


# --------------------------------------------------------------------------- throttle


class FakeClock:
    def __init__(self, now: float):
        self.now = now
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_stretch_step_makes_a_step_last_one_over_speed():
    clock = FakeClock(10.3)  # the step began at 10.0: it took 0.3 s
    assert stretch_step(10.0, 0.25, sleep=clock.sleep, clock=clock) == pytest.approx(0.9)
    assert clock.now - 10.0 == pytest.approx(0.3 / 0.25)
    clock = FakeClock(10.3)
    assert stretch_step(10.0, 0.5, sleep=clock.sleep, clock=clock) == pytest.approx(0.3)
    assert clock.slept == [pytest.approx(0.3)]


def test_full_speed_never_sleeps():
    clock = FakeClock(5.0)
    assert stretch_step(1.0, 1.0, sleep=clock.sleep, clock=clock) == 0.0
    assert clock.slept == []
    with pytest.raises(ValueError, match="0"):
        stretch_step(1.0, 0.0, sleep=clock.sleep, clock=clock)


def test_parse_speeds():
    assert parse_speeds("", 3) == [1.0, 1.0, 1.0]
    assert parse_speeds("1,1,0.5,0.25", 4) == [1.0, 1.0, 0.5, 0.25]
    with pytest.raises(ValueError, match="one speed per worker"):
        parse_speeds("1,0.5", 3)
    with pytest.raises(ValueError, match="'1,fast'"):
        parse_speeds("1,fast", 2)
    with pytest.raises(ValueError, match="got 2"):
        parse_speeds("1,2", 2)
    with pytest.raises(ValueError, match="got 0"):
        parse_speeds("0,1", 2)


def test_demo_refuses_bad_speeds_in_one_line():
    from geotrain.cli import cli

    result = CliRunner().invoke(cli, ["demo", "--workers", "2", "--speeds", "1,0.5,0.5"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: --speeds needs one speed per worker (2), got 3 in '1,0.5,0.5'"]
    assert "Traceback" not in result.output


def test_worker_refuses_a_speed_outside_0_1():
    from geotrain.worker.cli import main

    for bad in ("0", "1.5"):
        result = CliRunner().invoke(main, ["--coordinator", "127.0.0.1:1", "--speed", bad])
        assert result.exit_code == 2, result.output
        assert "--speed" in result.output and "Traceback" not in result.output
