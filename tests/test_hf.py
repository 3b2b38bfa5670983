"""GPT-2 weights in and out of Hugging Face format: transformers loads what geotrain exports with
the same logits, imported weights give transformers' logits in geotrain, import -> export is
bit-exact, fine-tuning from imported weights in the reference trainer and in a 2-worker demo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from click.testing import CliRunner

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from geotrain.cli import cli  # noqa: E402
from geotrain.common.checkpoint import load_latest_checkpoint, save_checkpoint  # noqa: E402
from geotrain.common.config import ModelConfig, RunConfig, apply_overrides, load_run_config  # noqa: E402
from geotrain.common.reader import TokenData  # noqa: E402
from geotrain.common.hf import load_hf_gpt2, model_config_from_hf  # noqa: E402
from geotrain.common.model import GPT  # noqa: E402
from geotrain.common.tokenizer import ByteTokenizer  # noqa: E402

BLOCK = 32



def random_hf_model(vocab_size: int = 257, n_positions: int = BLOCK, activation: str = "gelu", seed: int = 0) -> GPT2LMHeadModel:
    """A GPT2LMHeadModel with every parameter random (biases and LayerNorms too), in eval mode."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=32, n_layer=2, n_head=4,
                        activation_function=activation, bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    random_hf_model().save_pretrained(path)
    return path


def _geotrain_checkpoint(root: Path, cfg: ModelConfig, seed: int = 1, coordinator: bool = False) -> tuple[Path, GPT]:
    """A checkpoint laid out as the reference trainer (or the coordinator) writes it."""
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # LayerNorms and biases away from 1 and 0
    state = {"step": 7, "model_config": cfg.to_dict(), "tokenizer": ByteTokenizer().spec()}
    if coordinator:
        tensors = {f"model.{n}": p.detach() for n, p in model.named_parameters()}
        tensors["outer.momentum.x"] = torch.zeros(3)
        save_checkpoint(root / "checkpoints", 7, tensors, {**state, "version": 7})
    else:
        save_checkpoint(root / "checkpoints", 7, model.state_dict(), state)
    return root, model


def _logits_geotrain(model: GPT, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits, _ = model(x, x)  # with targets: every position's logits
    return logits


# --------------------------------------------------------------------------- export


@pytest.mark.parametrize("bias,coordinator", [(False, False), (True, True)])
def test_export_loads_in_transformers_with_same_logits(tmp_path, bias, coordinator):
    cfg = ModelConfig(n_layer=2, n_head=4, n_embd=32, block_size=BLOCK, vocab_size=257, bias=bias)
    run_dir, model = _geotrain_checkpoint(tmp_path / "run", cfg, coordinator=coordinator)
    out = tmp_path / "hf"
    result = CliRunner().invoke(cli, ["export", "--checkpoint", str(run_dir), "--hf", str(out)])
    assert result.exit_code == 0, result.output
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    assert hf.config.activation_function == "gelu" and hf.config.n_positions == BLOCK
    x = torch.randint(0, 257, (3, BLOCK), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf(x).logits
    ours = _logits_geotrain(model, x)
    assert (theirs - ours).abs().max().item() < 1e-4


def test_export_byte_tokenizer_files(tmp_path):
    from transformers import AutoTokenizer

    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=257)
    run_dir, _ = _geotrain_checkpoint(tmp_path / "run", cfg)
    out = tmp_path / "hf"
    assert CliRunner().invoke(cli, ["export", "--checkpoint", str(run_dir), "--hf", str(out)]).exit_code == 0
    tok = AutoTokenizer.from_pretrained(out)
    plain = "naïve café, 1 + 1"
    assert tok.encode(plain) == list(plain.encode("utf-8"))
    assert tok.decode(list(plain.encode("utf-8"))) == plain
    assert tok.eos_token_id == 256


def test_export_refuses_a_vocabulary_that_does_not_match_the_tokenizer(tmp_path):
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=257)
    run_dir, _ = _geotrain_checkpoint(tmp_path / "run", cfg)
    result = CliRunner().invoke(cli, ["export", "--checkpoint", str(run_dir), "--hf", str(tmp_path / "o"),
                                      "--tokenizer", "gpt2"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: checkpoint {run_dir / 'checkpoints' / 'ckpt-00000007'} was trained with the byte tokenizer, not gpt2"
    ]
    # imported token ids (no known tokenizer) with a vocabulary smaller than gpt2's
    torch.manual_seed(0)
    small = GPT(cfg)
    save_checkpoint(tmp_path / "ext" / "checkpoints", 1, small.state_dict(),
                    {"step": 1, "model_config": cfg.to_dict(), "tokenizer": {"name": "external", "vocab_size": 257, "eot_id": -1}})
    result = CliRunner().invoke(cli, ["export", "--checkpoint", str(tmp_path / "ext"), "--hf", str(tmp_path / "o2"),
                                      "--tokenizer", "gpt2"])
    assert result.exit_code == 2 and "has a 257-token vocabulary but the gpt2 tokenizer has 50257 tokens" in result.output
    assert len(result.output.strip().splitlines()) == 1


# --------------------------------------------------------------------------- import


@pytest.mark.parametrize("activation", ["gelu", "gelu_new"])
def test_init_from_gives_transformers_logits(tmp_path, activation):
    hf = random_hf_model(activation=activation, seed=3)
    hf.save_pretrained(tmp_path / "m")
    cfg, state, _ = load_hf_gpt2(tmp_path / "m")
    assert cfg == ModelConfig(n_layer=2, n_head=4, n_embd=32, block_size=BLOCK, vocab_size=257, bias=True)
    model = GPT(cfg).eval()
    model.load_state_dict(state)
    assert model.lm_head.weight is model.transformer.wte.weight
    x = torch.randint(0, 257, (2, BLOCK), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = hf(x).logits
    diff = (theirs - _logits_geotrain(model, x)).abs().max().item()
    if activation == "gelu":
        assert diff < 1e-4
    else:  # geotrain computes the exact GELU: close, not equal (README: GPT-2 weights)
        assert 1e-7 < diff < 1e-2


def test_import_then_export_is_bit_exact(tmp_path, hf_dir):
    cfg, state, _ = load_hf_gpt2(hf_dir)
    model = GPT(cfg)
    model.load_state_dict(state)
    save_checkpoint(tmp_path / "run" / "checkpoints", 1, model.state_dict(),
                    {"step": 1, "model_config": cfg.to_dict(), "tokenizer": ByteTokenizer().spec()})
    out = tmp_path / "back"
    result = CliRunner().invoke(cli, ["export", "--checkpoint", str(tmp_path / "run"), "--hf", str(out)])
    assert result.exit_code == 0, result.output
    before = safetensors.torch.load_file(hf_dir / "model.safetensors")
    after = safetensors.torch.load_file(out / "model.safetensors")
    assert sorted(before) == sorted(after)
    for name in before:
        assert before[name].dtype == after[name].dtype and torch.equal(before[name], after[name]), name
    original, exported = json.loads((hf_dir / "config.json").read_text()), json.loads((out / "config.json").read_text())
    for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "activation_function", "layer_norm_epsilon"):
        assert original[key] == exported[key], key


def test_block_size_crops_positions(hf_dir):
    cfg, state, _ = load_hf_gpt2(hf_dir, block_size=8)
    assert cfg.block_size == 8 and state["transformer.wpe.weight"].shape == (8, 32)
    with pytest.raises(ValueError, match="block_size 64 must be in"):
        load_hf_gpt2(hf_dir, block_size=64)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"model_type": "llama"}, "model_type is 'llama', not 'gpt2'"),
        ({"activation_function": "relu"}, "activation_function is 'relu'"),
        ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon is 1e-06"),
        ({"n_inner": 100}, "n_inner is 100"),
        ({"n_layer": "two"}, "n_layer must be a positive integer"),
    ],
)
def test_init_from_refuses_a_config_that_is_not_gpt2_shaped(tmp_path, hf_dir, corpus, change, message):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((hf_dir / "model.safetensors").read_bytes())
    (bad / "config.json").write_text(json.dumps({**json.loads((hf_dir / "config.json").read_text()), **change}))
    with pytest.raises(ValueError, match=message):
        model_config_from_hf(json.loads((bad / "config.json").read_text()))
    result = CliRunner().invoke(cli, ["train", "--init-from", str(bad), "--data", str(corpus),
                                      "--out", str(tmp_path / "o"), "--max-iters", "1"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad / 'config.json'}: ") and message in lines[0]


def test_init_from_refuses_data_of_another_vocabulary(tmp_path, corpus):
    random_hf_model(vocab_size=300).save_pretrained(tmp_path / "m300")
    result = CliRunner().invoke(cli, ["train", "--init-from", str(tmp_path / "m300"), "--data", str(corpus),
                                      "--out", str(tmp_path / "o"), "--max-iters", "1"])
    assert result.exit_code == 2
    assert "the data's vocabulary (257 tokens, tokenizer byte) does not match the 300-token model" in result.output
    result = CliRunner().invoke(cli, ["train", "--init-from", str(tmp_path / "nowhere"), "--data", str(corpus),
                                      "--out", str(tmp_path / "o"), "--max-iters", "1"])
    assert result.exit_code == 2 and "is neither a directory nor one of" in result.output


# --------------------------------------------------------------------------- fine-tuning


def test_finetune_recipe_defaults():
    run = load_run_config(None, "finetune")
    assert (run.optim.lr, run.optim.min_lr, run.optim.warmup_iters) == (3e-5, 3e-5, 0)
    assert (run.train.batch_size, run.train.grad_accum, run.train.max_iters) == (1, 32, 20)
    with pytest.raises(ValueError, match="unknown recipe 'pretrain'"):
        load_run_config(None, "pretrain")


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in b)


def test_finetune_in_reference_trainer(tmp_path, hf_dir, corpus):
    out = tmp_path / "ft"
    result = CliRunner().invoke(cli, ["train", "--init-from", str(hf_dir), "--recipe", "finetune", "--data", str(corpus),
                                      "--out", str(out), "--max-iters", "4", "--grad-accum", "2", "--batch-size", "2",
                                      "--eval-iters", "2", "--threads", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["iter"] for h in history] == [0, 4] and {h["lr"] for h in history} == {3e-5}  # constant lr
    # iteration 0 evaluates the imported model: its loss is transformers' loss on the same batch
    _, start, _ = load_hf_gpt2(hf_dir)
    tensors, state, _ = load_latest_checkpoint(out / "checkpoints")
    assert state["model_config"]["bias"] and state["model_config"]["n_embd"] == 32
    moved = _max_diff(tensors, start)
    assert 0 < moved < 1e-3  # 4 Adam steps of lr 3e-5 from the imported weights (a fresh model is ~0.1 away)
    data = TokenData(corpus)
    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    from geotrain.common.train import eval_seed

    total = 0.0
    for k in range(2):
        for split in ("val",):
            x, y = data.get_batch(split, 2, BLOCK, seed=eval_seed(1337), step=k)
            with torch.no_grad():
                total += torch.nn.functional.cross_entropy(hf(x).logits.flatten(0, 1), y.flatten()).item()
    assert abs(history[0]["val_loss"] - total / 2) < 1e-4


@pytest.mark.slow
def test_finetune_in_a_two_worker_demo(tmp_path, hf_dir, corpus):
    from geotrain.common.config import DemoConfig
    from geotrain.demo import run_demo

    toml = tmp_path / "ft.toml"
    toml.write_text("[optim]\nlr = 3e-5\nmin_lr = 3e-5\nwarmup_iters = 0\n[round]\nsteps = 5\n")
    run_dir = tmp_path / "demo"
    summary = run_demo(DemoConfig(
        workers=2, data=str(corpus), config=str(toml), tokens=2 * 20 * 4 * BLOCK, batch_size=4,
        run_dir=str(run_dir), quiet=True, extra_coordinator_args=["--init-from", str(hf_dir)],
    ))
    assert summary["model_version"] > 1 and summary["tokens"] > 0
    for i in range(2):
        log = (run_dir / "logs" / f"worker-{i}.log").read_text()
        assert "rebuilt from the seed" not in log
    tensors, state, _ = load_latest_checkpoint(run_dir / "checkpoints")
    _, start, _ = load_hf_gpt2(hf_dir)
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    moved = _max_diff(weights, {k: v for k, v in start.items() if k in weights})
    assert 0 < moved < 0.01  # fine-tuned from the imported weights, not from a fresh model
    assert state["model_config"] == {**state["model_config"], "n_embd": 32, "n_layer": 2, "bias": True}


def test_export_with_gpt2_tokenizer_cuts_a_padded_vocabulary(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network in tests
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=50304, bias=True)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    save_checkpoint(tmp_path / "owt" / "checkpoints", 5, model.state_dict(),
                    {"step": 5, "model_config": cfg.to_dict(), "tokenizer": {"name": "external", "vocab_size": 50304, "eot_id": -1}})
    out = tmp_path / "hf"
    result = CliRunner().invoke(cli, ["export", "--checkpoint", str(tmp_path / "owt"), "--hf", str(out), "--tokenizer", "gpt2"])
    assert result.exit_code == 0, result.output
    assert "note: GPT-2 tokenizer files not written" in result.output
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    assert hf.config.vocab_size == 50257 and hf.config.eos_token_id == 50256
    x = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf(x).logits
    assert (theirs - _logits_geotrain(model, x)[..., :50257]).abs().max().item() < 1e-4


def test_coordinator_refuses_a_config_that_is_not_gpt2_shaped(tmp_path, hf_dir, corpus):
    import subprocess
    import sys

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((hf_dir / "model.safetensors").read_bytes())
    (bad / "config.json").write_text(json.dumps({**json.loads((hf_dir / "config.json").read_text()), "model_type": "gpt_neox"}))
    proc = subprocess.run(
        [sys.executable, "-m", "geotrain.coordinator.cli", "--data", str(corpus), "--init-from", str(bad),
         "--run-dir", str(tmp_path / "run"), "--port", "0", "--metrics-port", "0"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {bad / 'config.json'}: model_type is 'gpt_neox', not 'gpt2': only GPT-2 shaped models import"
    ]
