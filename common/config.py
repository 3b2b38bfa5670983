"""Typed configuration for every geotrain command, with all defaults in one place.

The CLIs map flags and an optional TOML file onto these dataclasses:
precedence is command-line flag > TOML file > the defaults below.

A run config TOML looks like::

    [model]
    preset = "nano"          # any ModelConfig field may follow and overrides the preset
    n_layer = 6

    [data]
    dir = "data/shakespeare"  # empty: the embedded default corpus

    [optim]                   # inner optimizer (AdamW) and schedule
    lr = 1e-3

    [outer]                   # coordinator's outer optimizer
    kind = "nesterov"

    [round]
    steps = 50

    [merge]
    policy = "async"

    [compression]
    scheme = "sign"

Unknown tables or keys raise ValueError naming them, so a typo never passes silently.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


# --------------------------------------------------------------------------- model


@dataclass
class ModelConfig:
    """GPT-2 style decoder shape. vocab_size is normally taken from the data's tokenizer."""

    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    vocab_size: int = 257
    dropout: float = 0.0
    bias: bool = False

    def validate(self) -> "ModelConfig":
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"model.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# nanoGPT's CPU Shakespeare recipe is `nano`; the GPT-2 family follows OpenAI's sizes.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "nano": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0, bias=False),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, dropout=0.0, bias=True),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024, dropout=0.0, bias=True),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024, dropout=0.0, bias=True),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024, dropout=0.0, bias=True),
}


def model_config(preset: str = "nano", vocab_size: int | None = None, **overrides: Any) -> ModelConfig:
    """Build a ModelConfig from a preset name plus field overrides (None values are ignored)."""
    if preset not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(MODEL_PRESETS)}")
    values = dict(MODEL_PRESETS[preset])
    if vocab_size is not None:
        values["vocab_size"] = vocab_size
    known = {f.name for f in fields(ModelConfig)}
    for key, value in overrides.items():
        if key not in known:
            raise ValueError(f"unknown model field {key!r}; known: {sorted(known)}")
        if value is not None:
            values[key] = value
    return ModelConfig(**values).validate()


# --------------------------------------------------------------------------- sections


@dataclass
class ModelSection:
    """The [model] table: a preset plus optional overrides of ModelConfig fields."""

    preset: str = "nano"
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    block_size: int | None = None
    dropout: float | None = None
    bias: bool | None = None

    def build(self, vocab_size: int) -> ModelConfig:
        overrides = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "preset"}
        return model_config(self.preset, vocab_size=vocab_size, **overrides)


@dataclass
class DataSection:
    """Where the token shards live. Empty dir means the embedded default corpus."""

    dir: str = ""


@dataclass
class OptimConfig:
    """Inner optimizer (AdamW) and learning-rate schedule: linear warmup, cosine decay to min_lr.

    Defaults follow nanoGPT's Shakespeare-char recipe.
    """

    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int | None = None  # None: decay ends at max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 disables clipping

    def validate(self) -> "OptimConfig":
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}")
        if self.warmup_iters < 0:
            raise ValueError(f"warmup_iters must be >= 0, got {self.warmup_iters}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"betas must be in [0, 1), got beta1={self.beta1}, beta2={self.beta2}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError(
                f"grad_clip and weight_decay must be >= 0, got {self.grad_clip}, {self.weight_decay}"
            )
        return self


@dataclass
class TrainConfig:
    """The reference single-process trainer (`geotrain train`)."""

    batch_size: int = 12
    grad_accum: int = 1
    max_iters: int = 2000
    eval_interval: int = 250
    eval_iters: int = 200
    log_interval: int = 10
    checkpoint_interval: int = 250
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    compile: bool = False
    threads: int = 0  # torch intra-op threads on CPU; 0 = torch's default

    def validate(self) -> "TrainConfig":
        for name in ("batch_size", "grad_accum", "max_iters", "eval_interval", "eval_iters"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        return self


@dataclass
class OuterConfig:
    """The coordinator's outer optimizer, applied to merged deltas.

    kind = "nesterov": SGD with Nesterov momentum on the outer gradient (-delta), DiLoCo style:
    m = momentum * m + delta; update = lr * (delta + momentum * m).
    kind = "average": the global model moves by lr * weighted mean delta (lr 1.0 = plain averaging).

    Default nesterov, lr 0.8, momentum 0.8 (benchmarks/README.md, nano recipe, 2000 steps per
    worker, H = 50, 2 replicas): plain averaging ended 8.7% above data parallel, nesterov 0.5/0.9
    +5.9%, 0.7/0.9 (the DiLoCo paper's, tuned for H = 500 from a warm model) +3.5%, 1.0/0.5 +0.4%,
    0.8/0.8 1.3% below it. A steady direction moves lr / (1 - momentum) = 4x per round.
    """

    kind: str = "nesterov"
    lr: float = 0.8
    momentum: float = 0.8

    def validate(self) -> "OuterConfig":
        if self.kind not in ("nesterov", "average"):
            raise ValueError(f"outer.kind must be 'nesterov' or 'average', got {self.kind!r}")
        if self.lr <= 0 or not 0 <= self.momentum < 1:
            raise ValueError(f"need outer.lr > 0 and 0 <= outer.momentum < 1, got {self.lr}, {self.momentum}")
        return self


@dataclass
class RoundConfig:
    """How long a worker trains locally before sending its delta.

    steps > 0: a fixed number of inner steps. Otherwise seconds > 0: wall-clock time, so a fast
    GPU does more steps than a slow one.
    """

    steps: int = 50
    seconds: float = 0.0
    # Inner steps a worker may train past its push before it waits for that push's merge (0: no
    # limit, the worker never waits). The steps trained on the old basepoint while a merge is in
    # flight cost quality (README: merge lag); a small bound trades a little waiting for it.
    max_lag_steps: int = 0

    def validate(self) -> "RoundConfig":
        if self.steps <= 0 and self.seconds <= 0:
            raise ValueError("round needs steps > 0 or seconds > 0")
        if not isinstance(self.max_lag_steps, int) or self.max_lag_steps < 0:
            raise ValueError(f"round.max_lag_steps must be an int >= 0, got {self.max_lag_steps!r}")
        return self


@dataclass
class MergeConfig:
    """How the coordinator merges deltas.

    policy "async": apply each delta as it arrives. "semi-sync": collect from all live workers up
    to semi_sync_timeout seconds, then apply them together.
    """

    policy: str = "semi-sync"
    max_staleness: int = 8  # versions; an older delta is refused (FAILED_PRECONDITION)
    semi_sync_timeout: float = 0.0  # seconds; 0 = derived: 3 x the median round time, min 10 s
    staleness_power: float = 0.5  # weight multiplier 1 / (1 + staleness) ** power
    max_delta_norm_ratio: float = 0.0  # >0: refuse deltas whose norm exceeds ratio x recent median
    clip_outliers: bool = False  # with max_delta_norm_ratio: clip instead of refusing
    # "tokens": a delta weighs its share of the merge's tokens; "equal": every delta of a merge the
    # same (before staleness damping). Downlink "count" weighs deltas of similar size equally anyway.
    weights: str = "tokens"

    def validate(self) -> "MergeConfig":
        if self.policy not in ("async", "semi-sync"):
            raise ValueError(f"merge.policy must be 'async' or 'semi-sync', got {self.policy!r}")
        if self.max_staleness < 0:
            raise ValueError(f"merge.max_staleness must be >= 0, got {self.max_staleness}")
        if self.weights not in ("tokens", "equal"):
            raise ValueError(f"merge.weights must be 'tokens' or 'equal', got {self.weights!r}")
        return self


@dataclass
class CompressionConfig:
    """Codec for deltas in both directions (see common/compression.py)."""

    scheme: str = "none"  # none | bf16 | int8 | int4 | sign | ternary (common/compression.py)
    chunk: int = 256  # values per scale for chunked schemes
    zstd_level: int = 3
    # How a merged version reaches the workers:
    #   relay:  the merged workers' compressed deltas as they were pushed, with their merge weights;
    #           every worker replays the coordinator's combine + outer step on them bit-exactly (it
    #           keeps a copy of the outer momentum). Lossless: no downlink compression error. Costs
    #           (deltas in the merge - the worker's own) pushes per version: the same as "recode"
    #           for the async policy and for 2 workers, more for larger semi-sync merges.
    #   combine: the merge's weighted mean delta, compressed with `scheme` and error feedback on the
    #           coordinator, as one relayed delta; every worker replays the outer step on exactly
    #           what it decodes (bit-identical, like relay). One payload per version for any merge
    #           size; what quantization drops joins the next merge.
    #   count:  for scheme "tsign": the coordinator publishes per-tensor scales with every version
    #           and the workers encode their next deltas with them, so a merge of N such deltas
    #           with equal weights is k x scale x weight, k the sum of their signs per value; each
    #           worker then receives, per value, how many of the others share its own delta's sign
    #           (common/counts.py: 2 bits before zstd for 4 workers, where relay sends 3) and
    #           replays the merge bit-identically. Merges that are not counts (unequal tokens, a
    #           clipped or stale delta, the first round) are relayed. Lossless like relay.
    #   recode: the outer update itself, compressed with `scheme` and error feedback on the
    #           coordinator: one payload per version, whatever the merge's size; the workers'
    #           basepoints lag the coordinator's exact update by the feedback residual.
    downlink: str = "relay"
    # Scheme of the coordinator's payload under "combine" and "recode" ("" = `scheme`).
    downlink_scheme: str = ""
    # Scheme of a worker's last delta of the run (its final partial round, sent when its data runs
    # out) under the coarse schemes sign, tsign, ternary and int4: the error-feedback residual left
    # in its weights goes out with it, so it must not be 1-bit. int8 (default) or int4.
    last_scheme: str = "int8"
    # Sync groups' all-reduce schedule (worker/allreduce.py), the same for every member of the run:
    # auto (doubling for 2, count from 4; halving from 4 without compression) | doubling | halving
    # | allgather | scatter | count (1-bit only). halving and scatter re-quantize means, which costs
    # training quality; count moves the fewest bytes from 4 members (worker/allreduce.py, README).
    sync_schedule: str = "auto"

    @property
    def down_scheme(self) -> str:
        """The scheme of the coordinator's downlink payload (combine, recode)."""
        return self.downlink_scheme or self.scheme

    def validate(self) -> "CompressionConfig":
        if self.scheme not in DELTA_SCHEMES:
            raise ValueError(f"compression.scheme must be one of {DELTA_SCHEMES}, got {self.scheme!r}")
        if not 1 <= self.chunk <= 1 << 20:
            raise ValueError(f"compression.chunk must be in [1, {1 << 20}], got {self.chunk!r}")
        if not 1 <= self.zstd_level <= 22:
            raise ValueError(f"compression.zstd_level must be in [1, 22], got {self.zstd_level!r}")
        if self.last_scheme not in ("int8", "int4"):
            raise ValueError(f"compression.last_scheme must be 'int8' or 'int4', got {self.last_scheme!r}")
        if self.downlink_scheme not in ("", *DELTA_SCHEMES):
            raise ValueError(f"compression.downlink_scheme must be '' or one of {DELTA_SCHEMES}, got {self.downlink_scheme!r}")
        if self.downlink not in DOWNLINKS:
            raise ValueError(f"compression.downlink must be one of {DOWNLINKS}, got {self.downlink!r}")
        if self.downlink == "count" and self.scheme != "tsign":
            raise ValueError(f"compression.downlink 'count' needs compression.scheme 'tsign', got {self.scheme!r}")
        if self.sync_schedule not in SYNC_SCHEDULES:
            raise ValueError(f"compression.sync_schedule must be one of {SYNC_SCHEDULES}, got {self.sync_schedule!r}")
        return self


DELTA_SCHEMES = ("none", "bf16", "int8", "int4", "sign", "ternary", "tsign")  # == common.compression.SCHEMES
DOWNLINKS = ("relay", "combine", "recode", "count")
REPLAYED_DOWNLINKS = ("relay", "combine", "count")  # workers keep an outer-momentum replica and replay versions
SYNC_SCHEDULES = ("auto", "doubling", "halving", "allgather", "scatter", "count")  # worker/allreduce.py ALGORITHMS


@dataclass
class CheckpointConfig:
    """Coordinator checkpoints: every `every_versions` versions or `every_seconds`, keep last `keep`."""

    every_versions: int = 5
    every_seconds: float = 60.0
    keep: int = 3


@dataclass
class EvalConfig:
    """Periodic validation of the global model on the coordinator."""

    every_versions: int = 5
    iters: int = 20
    batch_size: int = 12
    device: str = "cpu"  # where the coordinator evaluates ("cuda", "cuda:1", ...): a GPU spares the merges
    max_tokens: int = 65536  # at most this many tokens per evaluation (iters shrink to fit); 0 = iters x batch


@dataclass
class DataPlanConfig:
    """How the training stream is cut into leasable work units."""

    unit_tokens: int = 65536  # tokens per work unit (one lease)
    max_tokens: int = 0  # training tokens for the whole run; 0 = no limit (run until stopped)


@dataclass
class WorkersConfig:
    """Membership: how often workers heartbeat and when a silent one is dropped."""

    heartbeat_seconds: float = 2.0
    lease_seconds: float = 20.0  # no heartbeat for this long: dropped, its data returns to the pool
    max_workers: int = 256
    history_versions: int = 64  # merged updates kept in memory for workers catching up
    history_fraction: float = 1.0  # ... and at most this fraction of the model's fp32 bytes, in (0, 1]


@dataclass
class RunConfig:
    """Everything the coordinator needs for an async run; sent to workers on join."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    round: RoundConfig = field(default_factory=RoundConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    plan: DataPlanConfig = field(default_factory=DataPlanConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)

    def validate(self) -> "RunConfig":
        self.optim.validate()
        self.train.validate()
        self.outer.validate()
        self.round.validate()
        self.merge.validate()
        self.compression.validate()
        if self.model.preset not in MODEL_PRESETS:
            raise ValueError(
                f"unknown model preset {self.model.preset!r}; choose one of {sorted(MODEL_PRESETS)}"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- loading


def _fill(cls: type, values: Mapping[str, Any], where: str) -> Any:
    """Build dataclass `cls` from a mapping, recursing into nested dataclasses; unknown keys raise."""
    known = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            raise ValueError(f"unknown key {where}{key!r}; known: {sorted(known)}")
        default = getattr(cls(), key)
        if dataclasses.is_dataclass(default):
            if not isinstance(value, Mapping):
                raise ValueError(f"{where}{key} must be a table, got {value!r}")
            kwargs[key] = _fill(type(default), value, f"{where}{key}.")
        else:
            kwargs[key] = _coerce(value, default, f"{where}{key}")
    return cls(**kwargs)


def _coerce(value: Any, default: Any, name: str) -> Any:
    """Accept ints for floats; otherwise the value must have the default's type (None = any)."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return value
    if isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, int) and isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(default, str) and isinstance(value, str):
        return value
    raise ValueError(f"{name} must be of type {type(default).__name__}, got {value!r}")


def run_config_from_dict(values: Mapping[str, Any]) -> RunConfig:
    return _fill(RunConfig, values, "").validate()


def load_run_config(path: str | Path | None) -> RunConfig:
    """Read a run TOML file into a RunConfig (defaults when path is None)."""
    if path is None:
        return RunConfig().validate()
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    try:
        values = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"config file {path} is not valid TOML: {exc}") from exc
    return run_config_from_dict(values)


def apply_overrides(config: Any, overrides: Mapping[str, Any]) -> Any:
    """Set dotted keys ("optim.lr": 3e-4) on a nested dataclass; None values are skipped."""
    for dotted, value in overrides.items():
        if value is None:
            continue
        target = config
        *parents, leaf = dotted.split(".")
        for part in parents:
            target = getattr(target, part)
        if not hasattr(target, leaf):
            raise ValueError(f"unknown config key {dotted!r}")
        setattr(target, leaf, _coerce(value, getattr(target, leaf), dotted))
    return config
