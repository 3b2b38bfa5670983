"""HellaSwag scoring: acc and acc_norm on a hand-checked file, the batched scores against a
one-row-at-a-time reference, truncation to block_size, malformed rows named by line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from geotrain.cli import cli
from geotrain.common.checkpoint import save_checkpoint
from geotrain.common.config import ModelConfig
from geotrain.common.hellaswag import Example, example_rows, read_examples, score_batch
from geotrain.common.model import GPT
from geotrain.common.tokenizer import ByteTokenizer

# Hand-checked against the "repeat" model below, whose loss per predicted token is L ~ 2e-5 when
# the token repeats the previous one and H ~ 16 otherwise. Each ending is scored as " " + ending
# after the context, so its first two predictions (the space, its first letter) cost H.
#   1: "ab" 3H (mean H) | "abcdddddddd" 5H + 7L (mean 0.42H) | "abcdefgh" 9H | "qrstuv" 7H
#      label 1: acc picks 0 (wrong), acc_norm picks 1 (right)
#   2: "mmmmmm" 2H + 5L (mean 0.29H) | "abcdef" 7H | "mnop" 5H | "zyx" 4H
#      label 0: both pick 0 (right)
#   3: "abcdefg" 8H | "kkkkkkk" 2H + 6L | "pq" 3H | "rstu" 5H
#      label 0: both pick 1 (wrong)
# acc = 1/3, acc_norm = 2/3.
HAND_CHECKED = [
    {"ind": 1, "ctx": "x", "endings": ["ab", "abcdddddddd", "abcdefgh", "qrstuv"], "label": 1, "split": "val"},
    {"ind": 2, "ctx": "y", "endings": ["mmmmmm", "abcdef", "mnop", "zyx"], "label": 0, "split": "val"},
    {"ind": 3, "ctx": "w", "endings": ["abcdefg", "kkkkkkk", "pq", "rstu"], "label": 0, "split": "val"},
]


def repeat_model() -> GPT:
    """A byte-level GPT that predicts "the next byte repeats this one": blocks contribute nothing
    (zero projections), no position embedding, one-hot token embeddings (tied to the head)."""
    cfg = ModelConfig(n_layer=1, n_head=4, n_embd=260, block_size=16, vocab_size=257, bias=False)
    model = GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" not in name:
                p.zero_()
        model.transformer.wte.weight[:, :257] = torch.eye(257)
    return model.eval()


def _checkpoint(root: Path, model: GPT) -> Path:
    save_checkpoint(root / "checkpoints", 3, model.state_dict(),
                    {"step": 3, "model_config": model.config.to_dict(), "tokenizer": ByteTokenizer().spec()})
    return root


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("batch", ["1", "2", "4"])
def test_cli_hand_checked_acc_and_acc_norm(tmp_path, batch):
    run = _checkpoint(tmp_path / "run", repeat_model())
    file = _jsonl(tmp_path / "hs.jsonl", HAND_CHECKED)
    result = CliRunner().invoke(cli, ["eval", "--checkpoint", str(run), "--hellaswag", str(file), "--json",
                                      "--batch-size", batch, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["examples"] == 3 and report["correct"] == 1 and report["correct_norm"] == 2
    assert report["acc"] == pytest.approx(1 / 3) and report["acc_norm"] == pytest.approx(2 / 3)
    assert report["tokenizer"] == "byte" and report["step"] == 3
    result = CliRunner().invoke(cli, ["eval", "--checkpoint", str(run), "--hellaswag", str(file), "--limit", "1"])
    assert result.exit_code == 0 and "HellaSwag acc 0.0000, acc_norm 1.0000 over 1 examples" in result.output


def test_batched_scores_match_one_row_at_a_time():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=24, vocab_size=257, bias=True)).eval()
    tok = ByteTokenizer()
    examples = [Example("The cat", ["sat.", "ran far away", "x"], 0, 1),
                Example("A much longer context than the others", ["ok", "fine then"], 1, 2)]
    batch = [example_rows(e, tok, 24) for e in examples]
    scores = score_batch(model, batch, torch.device("cpu"))
    for (rows, starts), (summed, mean) in zip(batch, scores):
        for row, start, s, m in zip(rows, starts, summed, mean):
            x, y = torch.tensor([row[:-1]]), torch.tensor([row[1:]])
            with torch.no_grad():
                logits, _ = model(x, y)
            per_token = F.cross_entropy(logits[0], y[0], reduction="none")
            ending = per_token[start - 1:]  # the predictions of the ending's tokens
            assert s == pytest.approx(ending.sum().item(), rel=1e-5)
            assert m == pytest.approx(ending.mean().item(), rel=1e-5)


def test_rows_longer_than_the_block_keep_their_end():
    tok = ByteTokenizer()
    rows, starts = example_rows(Example("0123456789", ["abc", "de"], 0, 1), tok, block_size=8)
    assert rows[0] == list(b"56789 abc") and starts[0] == 5  # 9 tokens = block_size + 1
    assert rows[1] == list(b"456789 de") and starts[1] == 6


@pytest.mark.parametrize(
    "bad,message",
    [
        ("{not json", "line 2: not valid JSON"),
        ('["ctx"]', "line 2: expected a JSON object, got list"),
        ({"ctx": "a", "endings": ["b"], "label": 0}, "line 2: 'endings' must be a list of at least 2"),
        ({"ctx": "a", "endings": ["b", "c"], "label": 2}, "line 2: 'label' must be an integer in [0, 1], got 2"),
        ({"endings": ["b", "c"], "label": 0}, "line 2: 'ctx' must be a string, got None"),
    ],
)
def test_malformed_row_named_by_line(tmp_path, bad, message):
    file = _jsonl(tmp_path / "hs.jsonl", [HAND_CHECKED[0], bad, HAND_CHECKED[1]])
    with pytest.raises(ValueError) as info:
        read_examples(file)
    assert message in str(info.value)
    run = _checkpoint(tmp_path / "run", repeat_model())
    result = CliRunner().invoke(cli, ["eval", "--checkpoint", str(run), "--hellaswag", str(file)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {file}, line 2:") and message in lines[0]


def test_model_smaller_than_the_tokenizer_refused(tmp_path):
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=200))
    run = _checkpoint(tmp_path / "run", model)
    file = _jsonl(tmp_path / "hs.jsonl", HAND_CHECKED)
    result = CliRunner().invoke(cli, ["eval", "--checkpoint", str(run), "--hellaswag", str(file)])
    assert result.exit_code == 2 and "the byte tokenizer has 257 tokens but the model only 200" in result.output


def test_no_file_reads_the_cached_validation_split(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    (cache / "hellaswag").mkdir(parents=True)
    _jsonl(cache / "hellaswag" / "hellaswag_val.jsonl", HAND_CHECKED)
    monkeypatch.setenv("GEOTRAIN_CACHE", str(cache))
    run = _checkpoint(tmp_path / "run", repeat_model())
    result = CliRunner().invoke(cli, ["eval", "--checkpoint", str(run), "--hellaswag", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["file"] == str(cache / "hellaswag" / "hellaswag_val.jsonl") and report["correct_norm"] == 2


def test_coordinator_exports_hellaswag_acc_norm(tmp_path):
    from geotrain.common.prepare import prepare
    from geotrain.common.reader import TokenData
    from geotrain.common.hellaswag import evaluate_hellaswag
    from geotrain.common.config import RunConfig
    from geotrain.coordinator.metrics import CoordinatorMetrics
    from geotrain.coordinator.state import CoordinatorState

    (tmp_path / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 500)
    prepare([tmp_path / "a.txt"], tmp_path / "tokens", progress=False)
    data = TokenData(tmp_path / "tokens")
    file = _jsonl(tmp_path / "hs.jsonl", HAND_CHECKED * 3)
    run = RunConfig()
    run.model.n_layer, run.model.n_embd, run.model.n_head, run.model.block_size = 1, 32, 2, 16
    run.eval.iters, run.eval.hellaswag_file, run.eval.hellaswag_examples = 1, str(file), 4
    state = CoordinatorState(run, data, tmp_path / "run", metrics=CoordinatorMetrics())
    state.evaluate(1)
    model = GPT(state.model_config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(state.global_params[name])
    expected = evaluate_hellaswag(model, ByteTokenizer(), read_examples(file, 4), progress=False)["acc_norm"]
    assert state.metrics.registry.get_sample_value("geotrain_hellaswag_acc_norm") == expected
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert history[-1]["hellaswag_acc_norm"] == expected
    run.eval.hellaswag_file = str(_jsonl(tmp_path / "bad.jsonl", ["{"]))
    with pytest.raises(ValueError, match="bad.jsonl, line 1: not valid JSON"):
        CoordinatorState(run, data, tmp_path / "run2")
