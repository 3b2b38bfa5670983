"""common/memplan.py and `geotrain plan`: byte counts, the choices, sizes, the CLI's exits."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from geotrain.cli import cli
from geotrain.common.config import ModelConfig, model_config
from geotrain.common.memplan import (
    GiB,
    activation_bytes,
    balanced_micro_batch,
    count_params,
    make_plan,
    parse_size,
)
from geotrain.common.model import GPT

XL = model_config("gpt2-xl", vocab_size=50257)
GPT2 = model_config("gpt2", vocab_size=50257)


@pytest.mark.parametrize("cfg", [
    ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50, bias=False),
    ModelConfig(n_layer=3, n_head=4, n_embd=48, block_size=24, vocab_size=61, bias=True),
])
def test_count_params_matches_the_model(cfg):
    assert count_params(cfg) == GPT(cfg).num_params(non_embedding=False)


def test_gpt2_sizes():
    assert count_params(GPT2) == 124_439_808  # GPT-2 small, wpe included
    assert 1.55e9 < count_params(XL) < 1.56e9


def test_activation_formula():
    cfg = ModelConfig(n_layer=3, n_head=4, n_embd=8, block_size=16, vocab_size=10)
    B, T, C, H, L, V = 2, 16, 8, 4, 3, 10
    head = 4 * B * T * C + 10 * B * T * V  # embedding output + logits
    assert activation_bytes(cfg, 2, False) == L * 34 * B * T * C + head
    assert activation_bytes(cfg, 2, False, flash=False) == L * (34 * B * T * C + 5 * B * H * T * T) + head
    assert activation_bytes(cfg, 2, True) == L * 4 * B * T * C + 34 * B * T * C + head
    assert activation_bytes(cfg, 4, False) == 2 * activation_bytes(cfg, 2, False)
    with pytest.raises(ValueError, match="-1"):
        activation_bytes(cfg, -1, False)


def test_gpt2_xl_fits_24gib_with_a_lean_optimizer():
    plan = make_plan(XL, 24 * GiB, 12)
    assert plan.fits and plan.micro_batch >= 1 and plan.total_bytes <= 24 * GiB
    assert plan.optimizer_state == "offload" and plan.host_bytes == 16 * count_params(XL)
    with_8bit = make_plan(XL, 24 * GiB, 12, have_8bit=True)
    assert with_8bit.fits and with_8bit.optimizer_state == "8bit"
    fp32 = make_plan(XL, 24 * GiB, 12, optimizer_state="fp32")
    assert not fp32.fits and "optimizer state fp32" in fp32.reason
    assert make_plan(XL, 24 * GiB, 12, nproc=4).host_bytes == 4 * plan.host_bytes


def test_gpt2_xl_does_not_fit_4gib():
    plan = make_plan(XL, 4 * GiB, 12)
    assert not plan.fits and plan.micro_batch == 0
    assert "needs 16." in plan.reason and "has 4.0 GiB" in plan.reason and "checkpointing on" in plan.reason


def test_gpt2_fits_8gb_with_fp32_state():
    plan = make_plan(GPT2, 8 * 10**9, 12)
    assert plan.fits and plan.optimizer_state == "fp32" and not plan.checkpointing
    assert 1 <= plan.micro_batch < 12 and plan.total_bytes <= 8 * 10**9
    assert plan.grad_accum * plan.micro_batch >= 12 > (plan.grad_accum - 1) * plan.micro_batch


def test_checkpointing_on_only_when_needed():
    mem = 24 * GiB
    off = make_plan(XL, mem, 12)
    assert not off.checkpointing
    # shrink the memory until micro-batch 1 no longer fits without checkpointing
    need_off = make_plan(XL, 10**15, 1, optimizer_state="offload", checkpointing="off", micro_batch=1).total_bytes
    tight = make_plan(XL, need_off - 1, 12, optimizer_state="offload")
    assert tight.fits and tight.checkpointing and tight.micro_batch >= 1
    forced_off = make_plan(XL, need_off - 1, 12, optimizer_state="offload", checkpointing="off")
    assert not forced_off.fits


def test_more_memory_never_means_a_smaller_micro_batch():
    sizes = [make_plan(GPT2, g * GiB, 32).micro_batch for g in (6, 8, 12, 16, 24, 48, 80)]
    assert sizes == sorted(sizes) and sizes[-1] == 32


def test_explicit_choices_and_cpu():
    plan = make_plan(GPT2, 80 * GiB, 16, micro_batch=3, checkpointing="on", optimizer_state="offload")
    assert (plan.micro_batch, plan.checkpointing, plan.optimizer_state, plan.grad_accum) == (3, True, "offload", 6)
    cpu = make_plan(GPT2, None, 16)
    assert cpu.fits and cpu.micro_batch == 16 and cpu.optimizer_state == "fp32" and "autocast copies" not in cpu.parts
    assert make_plan(GPT2, None, 16, micro_batch=4, optimizer_state="offload").micro_batch == 4


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0), "batch_size"),
    (dict(checkpointing="maybe"), "'maybe'"),
    (dict(optimizer_state="fp16"), "'fp16'"),
    (dict(device_bytes=-5), "-5"),
])
def test_bad_arguments(kwargs, message):
    args = dict(cfg=GPT2, device_bytes=8 * GiB, batch_size=4) | kwargs
    with pytest.raises(ValueError, match=message):
        make_plan(**args)


def test_balanced_micro_batch():
    assert [balanced_micro_batch(12, m) for m in (12, 11, 7, 6, 5, 4, 3, 2, 1, 50)] == [12, 6, 6, 6, 4, 4, 3, 2, 1, 12]


@pytest.mark.parametrize("text, value", [
    ("24GiB", 24 * GiB), ("24GB", 24 * 10**9), ("24G", 24 * GiB), ("16000MiB", 16000 << 20),
    ("8 GB", 8 * 10**9), ("1.5GiB", 3 * GiB // 2), ("1048576", 1 << 20), ("80gib", 80 * GiB),
])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["24XB", "", "GiB", "-3GiB", "0GB", "24 GiB extra"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="bad memory size"):
        parse_size(text)


# --------------------------------------------------------------------------- CLI


def test_cli_plan_fits():
    result = CliRunner().invoke(cli, ["plan", "--model", "gpt2-xl", "--gpu-memory", "24GiB"])
    assert result.exit_code == 0, result.output
    assert "micro-batch" in result.output and "fits                      yes" in result.output
    result = CliRunner().invoke(cli, ["plan", "--model", "gpt2", "--gpu-memory", "8GB", "--nproc-per-node", "2",
                                      "--batch-size", "16", "--block-size", "512"])
    assert result.exit_code == 0 and "16 x 512 tokens" in result.output and "AdamW, fp32 state" in result.output


def test_cli_plan_does_not_fit():
    result = CliRunner().invoke(cli, ["plan", "--model", "gpt2-xl", "--gpu-memory", "4GiB"])
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: gpt2-xl does not fit in 4GiB: needs")


@pytest.mark.parametrize("args, message", [
    (["--gpu-memory", "24XB"], "bad memory size '24XB'"),
    (["--gpu-memory", "24GiB", "--model", "gpt5"], "unknown model preset 'gpt5'"),
])
def test_cli_plan_errors(args, message):
    result = CliRunner().invoke(cli, ["plan", *args])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [f"error: {result.stderr.strip()[7:]}"] and message in result.stderr
    assert "Traceback" not in result.output
