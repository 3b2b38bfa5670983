"""Reference trainer, lr schedule, bit-exact resume after SIGKILL, sample/eval, CLI errors."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from geotrain.common.checkpoint import load_latest_checkpoint
from geotrain.cli import cli
from geotrain.common.config import OptimConfig, RunConfig, apply_overrides
from geotrain.common.reader import TokenData
from geotrain.common.sampling import evaluate, load_model_from_checkpoint, sample, sample_tokens
from geotrain.common.train import check_model_config, lr_at, train

REPO = Path(__file__).resolve().parents[1]
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "16"]



def _run(corpus: Path, **overrides) -> RunConfig:
    run = RunConfig()
    values = {"data.dir": str(corpus), "model.n_layer": 1, "model.n_head": 2, "model.n_embd": 32,
              "model.block_size": 16, "train.batch_size": 4, "train.max_iters": 12,
              "train.eval_interval": 4, "train.eval_iters": 2, "train.checkpoint_interval": 4,
              "train.log_interval": 4, "optim.warmup_iters": 2}
    values.update(overrides)
    return apply_overrides(run, values).validate()


# --------------------------------------------------------------------------- schedule


def test_lr_schedule():
    oc = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_iters=100)
    assert lr_at(0, oc, 2000) == pytest.approx(1e-3 / 101)
    assert lr_at(49, oc, 2000) == pytest.approx(1e-3 * 50 / 101)
    assert lr_at(99, oc, 2000) == pytest.approx(1e-3 * 100 / 101)
    assert lr_at(100, oc, 2000) == pytest.approx(1e-3)  # peak right after warmup
    mid = 100 + (2000 - 100) // 2
    assert lr_at(mid, oc, 2000) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))  # cosine midpoint
    assert lr_at(2000, oc, 2000) == pytest.approx(1e-4)
    assert lr_at(5000, oc, 2000) == pytest.approx(1e-4)  # floor
    values = [lr_at(s, oc, 2000) for s in range(100, 2001)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay
    oc.lr_decay_iters = 1000
    assert lr_at(1000, oc, 2000) == pytest.approx(1e-4) and lr_at(1500, oc, 2000) == pytest.approx(1e-4)
    assert lr_at(0, OptimConfig(warmup_iters=0), 10) == pytest.approx(1e-3)


# --------------------------------------------------------------------------- trainer in-process


def test_train_outputs_and_eval_agree(corpus, tmp_path):
    out = tmp_path / "out"
    summary = train(_run(corpus), out, progress=False)
    for key in ("val_loss", "train_loss", "tokens", "seconds", "tokens_per_second", "params", "iters", "model"):
        assert key in summary, key
    assert summary["iters"] == 12 and summary["tokens"] == 12 * 4 * 16
    assert summary["val_loss"] < math.log(257)
    assert json.loads((out / "summary.json").read_text())["val_loss"] == summary["val_loss"]
    assert json.loads((out / "config.json").read_text())["model"]["n_embd"] == 32
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["iter"] for h in history] == [0, 4, 8, 12]
    assert set(history[0]) >= {"iter", "tokens", "seconds", "train_loss", "val_loss"}
    assert history[-1]["val_loss"] == summary["val_loss"]
    # the eval command's default windows are the trainer's: same batches, same loss
    model, cfg, spec = load_model_from_checkpoint(out)
    assert cfg.n_embd == 32 and spec["name"] == "byte"
    result = evaluate(model, TokenData(corpus), iters=2, batch_size=4)
    assert result["val_loss"] == pytest.approx(summary["val_loss"], abs=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(result["val_loss"]))


def _final_weights(out: Path) -> torch.Tensor:
    tensors, _, _ = load_latest_checkpoint(out / "checkpoints")
    return torch.cat([t.flatten() for _, t in sorted(tensors.items())])


def _by_hand(corpus: Path, run: RunConfig, windows: int) -> torch.Tensor:
    """The trainer's model after max_iters steps, computed here: each step one forward over the
    first `windows` of its grad_accum x batch_size windows (get_batch(seed, it * A + k))."""
    from geotrain.common.model import GPT, configure_optimizer

    data, tc, oc = TokenData(corpus), run.train, run.optim
    cfg = run.model.build(vocab_size=data.vocab_size)
    torch.manual_seed(tc.seed)
    model = GPT(cfg)
    opt = configure_optimizer(model, oc.weight_decay, oc.lr, (oc.beta1, oc.beta2), torch.device("cpu"))
    A, B = tc.grad_accum, tc.batch_size
    for it in range(tc.max_iters):
        parts = [data.get_batch("train", B, cfg.block_size, seed=tc.seed, step=it * A + k) for k in range(A)]
        x, y = torch.cat([p[0] for p in parts])[:windows], torch.cat([p[1] for p in parts])[:windows]
        for group in opt.param_groups:
            group["lr"] = lr_at(it, oc, tc.max_iters)
        model(x, y)[1].backward()
        opt.step()
        opt.zero_grad()
    return torch.cat([t.detach().flatten() for _, t in sorted(model.state_dict().items())])


def test_grad_accum_and_resume_without_checkpoint(corpus, tmp_path):
    # 2 x 4 windows per step, trained as 2 micro-batches of 4 (the default) and as one forward of 8
    fixed = {"train.max_iters": 4, "optim.grad_clip": 0.0, "train.eval_iters": 1, "train.grad_accum": 2}
    summary = train(_run(corpus, **fixed), tmp_path / "o", resume=True, progress=False)
    assert summary["tokens"] == 4 * 2 * 4 * 16 and summary["resumed_from"] is None
    assert summary["micro_batch"] == 4
    train(_run(corpus, **{"train.micro_batch": 8, **fixed}), tmp_path / "one", progress=False)
    full = _by_hand(corpus, _run(corpus, **fixed), windows=8)
    first = _by_hand(corpus, _run(corpus, **fixed), windows=4)  # a step without accumulation
    accumulated, whole = _final_weights(tmp_path / "o"), _final_weights(tmp_path / "one")
    gap = max((accumulated - full).abs().max(), (whole - full).abs().max())
    assert gap < 1e-5
    assert (first - full).abs().max() > 100 * gap + 1e-4


def test_lean_step_options_train_the_same_model(corpus, tmp_path):
    # offloaded AdamW, activation checkpointing and micro-batches of 1 change memory, not the update
    fixed = {"train.max_iters": 4, "train.eval_iters": 1}
    ref = train(_run(corpus, **fixed), tmp_path / "ref", progress=False)
    lean = train(_run(corpus, **{"train.optimizer_state": "offload", "train.activation_checkpointing": "on",
                                 "train.micro_batch": 1, "train.prefetch": 0, **fixed}), tmp_path / "lean", progress=False)
    assert (lean["optimizer_state"], lean["activation_checkpointing"], lean["micro_batch"]) == ("offload", True, 1)
    assert torch.allclose(_final_weights(tmp_path / "ref"), _final_weights(tmp_path / "lean"), atol=1e-5, rtol=0)
    assert lean["val_loss"] == pytest.approx(ref["val_loss"], abs=1e-4)


def test_fresh_run_into_used_dir_refused(corpus, tmp_path):
    train(_run(corpus, **{"train.max_iters": 4}), tmp_path, progress=False)
    with pytest.raises(ValueError, match="--resume"):
        train(_run(corpus, **{"train.max_iters": 4}), tmp_path, progress=False)


def test_checkpoint_of_other_model_refused(corpus, tmp_path):
    train(_run(corpus, **{"train.max_iters": 4}), tmp_path, progress=False)
    with pytest.raises(ValueError, match="another model config") as err:
        train(_run(corpus, **{"train.max_iters": 8, "model.n_embd": 16}), tmp_path, resume=True, progress=False)
    assert "'n_embd': 32" in str(err.value) and "'n_embd': 16" in str(err.value)
    cfg = _run(corpus).model.build(257)
    with pytest.raises(ValueError, match="another model config"):
        check_model_config({**cfg.to_dict(), "n_layer": 3}, cfg, tmp_path)


# --------------------------------------------------------------------------- bit-exact resume


def _cli_train(corpus: Path, out: Path, max_iters: int, *extra: str) -> list[str]:
    # `geotrain train` in a fresh interpreter (the console script may not be on PATH)
    return [sys.executable, "-c", "from geotrain.cli import main; main()", "train", "--data", str(corpus), "--out", str(out), *TINY,
            "--batch-size", "4", "--max-iters", str(max_iters), "--eval-interval", "50", "--eval-iters", "2",
            "--checkpoint-interval", "10", "--log-interval", "1", "--dropout", "0.1", "--threads", "1",
            "--warmup-iters", "5", "--no-progress", *extra]


def test_sigkill_then_resume_is_bit_exact(corpus, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    n = 150
    ref = subprocess.run(_cli_train(corpus, tmp_path / "ref", n), cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=240)
    assert ref.returncode == 0, ref.stderr

    proc = subprocess.Popen(_cli_train(corpus, tmp_path / "cut", n), cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("iter 25/"):  # past the checkpoint at 20, mid-interval
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "cut" / "summary.json").exists()

    resumed = subprocess.run(_cli_train(corpus, tmp_path / "cut", n, "--resume"), cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout

    a = json.loads((tmp_path / "ref" / "summary.json").read_text())
    b = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert b["resumed_from"] is not None and b["iters_this_run"] < n
    for key in ("val_loss", "train_loss", "last_batch_loss"):
        assert a[key] == b[key], key  # exactly, not approximately
    ta, sa, _ = load_latest_checkpoint(tmp_path / "ref" / "checkpoints")
    tb, sb, _ = load_latest_checkpoint(tmp_path / "cut" / "checkpoints")
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert torch.equal(sa["rng"]["torch"], sb["rng"]["torch"])
    ha = (tmp_path / "ref" / "history.jsonl").read_text().splitlines()
    hb = (tmp_path / "cut" / "history.jsonl").read_text().splitlines()
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in lines]  # noqa: E731
    assert strip(ha) == strip(hb)


# --------------------------------------------------------------------------- sample / eval / CLI


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained")
    train(_run(corpus, **{"train.max_iters": 8}), out, progress=False)
    return out


def test_sample_length(trained, corpus):
    model, cfg, spec = load_model_from_checkpoint(trained / "checkpoints")
    ids = sample_tokens(model, [1, 2, 3], max_new_tokens=40, seed=3, num_samples=2)
    assert ids.shape == (2, 43)  # longer than block_size: the context window slides
    again = sample_tokens(model, [1, 2, 3], max_new_tokens=40, seed=3, num_samples=2)
    assert torch.equal(ids, again)
    texts = sample(model, TokenData(corpus).tokenizer(), "the cat", max_new_tokens=25, seed=1)
    assert len(texts) == 1 and len(texts[0].encode("utf-8", errors="surrogatepass")) <= 25 * 3
    result = CliRunner().invoke(cli, ["sample", "--checkpoint", str(trained), "--prompt", "the",
                                      "--max-new-tokens", "30", "--top-k", "0", "--num-samples", "2"])
    assert result.exit_code == 0, result.output
    assert result.output.count("the") >= 2 and "-----" in result.output


def test_eval_json(trained, corpus):
    ckpt = next((trained / "checkpoints").glob("ckpt-*"))
    result = CliRunner().invoke(cli, ["eval", "--checkpoint", str(ckpt), "--data", str(corpus),
                                      "--iters", "3", "--batch-size", "2", "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.output)
    assert {"val_loss", "perplexity", "iters", "tokens", "checkpoint", "step"} <= set(got)
    assert got["iters"] == 3 and got["tokens"] == 3 * 2 * 16
    assert got["perplexity"] == pytest.approx(math.exp(got["val_loss"]))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "gpt5"], "unknown model preset 'gpt5'"),
        (["--lr", "fast"], "Invalid value for '--lr'"),
        (["--max-iters", "0"], "max_iters must be a positive integer"),
        (["--n-embd", "30", "--n-head", "4"], "divisible"),
        (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "nope"], "device"),
        (["--device", "cpu", "--optimizer-state", "8bit"], "optimizer state '8bit' needs a CUDA device"),
        (["--micro-batch", "-1"], "expected 'auto' or an integer >= 1, got '-1'"),
        (["--activation-checkpointing", "maybe"], "Invalid value for '--activation-checkpointing'"),
    ],
)
def test_cli_train_errors(corpus, tmp_path, args, message):
    result = CliRunner().invoke(cli, ["train", "--data", str(corpus), "--out", str(tmp_path / "o"),
                                      "--max-iters", "2", *args])
    assert result.exit_code != 0
    assert message in result.output


def test_cli_missing_checkpoint(tmp_path):
    for cmd in ("sample", "eval"):
        result = CliRunner().invoke(cli, [cmd, "--checkpoint", str(tmp_path)])
        assert result.exit_code == 2 and "no checkpoint found" in result.output


def test_cli_train_with_toml(corpus, tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(f'[model]\nn_layer = 1\nn_head = 2\nn_embd = 32\nblock_size = 16\n[data]\ndir = "{corpus}"\n'
                    '[train]\nmax_iters = 3\neval_interval = 3\neval_iters = 1\nbatch_size = 2\n')
    result = CliRunner().invoke(cli, ["train", "--config", str(toml), "--out", str(tmp_path / "o"),
                                      "--max-iters", "2", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["iters"] == 2  # flag beats file
