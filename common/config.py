"""Typed configuration for every geotrain command, with all defaults in one place.

The CLIs map flags and an optional TOML file onto these dataclasses: every option a user can set
is a field here, and the click options are derived from the fields (common/options.py): a field
declared with `opt(...)` becomes a flag (name `--field-name` unless `flag=` says otherwise), with
the field's default, type, help and choices, and the environment variable GEOTRAIN_<FLAG>
(`--round-steps` -> GEOTRAIN_ROUND_STEPS). Precedence: command-line flag > environment > TOML file
> the defaults below. Adding an option = adding a field with `opt(...)` and naming its dotted key
in the command's option list.

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

import copy
import dataclasses
import sys
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


# --------------------------------------------------------------------------- option metadata


@dataclass(frozen=True)
class CliMeta:
    """How a config field appears on the command line (read by common/options.py).

    flag: the option name ("--round-steps"); "" = "--" + the field name with dashes.
    choices: the allowed values (a click Choice). low / high: inclusive bounds of a number, except
    low_open (low itself refused). auto: the word that stands for the field's 0 ("auto" batch
    size). path: a file path (click.Path, no directories). required: the command needs it.
    hidden: left out of --help (secrets given on the command line).
    """

    help: str = ""
    flag: str = ""
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    auto: str = ""
    path: bool = False
    required: bool = False
    hidden: bool = False
    metavar: str | None = None
    case_sensitive: bool = True


def opt(default: Any = MISSING, *, help: str = "", flag: str = "", choices: Sequence[Any] | None = None,
        low: float | None = None, high: float | None = None, low_open: bool = False, auto: str = "",
        path: bool = False, required: bool = False, hidden: bool = False, metavar: str | None = None,
        case_sensitive: bool = True) -> Any:
    """A dataclass field that is also a command-line option (see CliMeta)."""
    meta = CliMeta(help=help, flag=flag, choices=tuple(choices) if choices is not None else None, low=low,
                   high=high, low_open=low_open, auto=auto, path=path, required=required, hidden=hidden,
                   metavar=metavar, case_sensitive=case_sensitive)
    return field(default=default, metadata={"cli": meta})


# --------------------------------------------------------------------------- model


VOCAB_MULTIPLE = 64  # embedding rows are padded to a multiple of this (50,257 -> 50,304, as nanoGPT)


def padded_vocab_size(vocab_size: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """The smallest multiple of ``multiple`` that holds ``vocab_size`` ids (matmul-friendly shapes)."""
    if not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ValueError(f"vocab size must be a positive integer, got {vocab_size!r}")
    return -(-vocab_size // multiple) * multiple


@dataclass
class ModelConfig:
    """GPT-2 style decoder shape. vocab_size is normally taken from the data's tokenizer.

    ``vocab_size``: rows of the embedding / columns of the logits. ``token_vocab_size``: the ids the
    data's tokenizer produces (the manifest's vocab_size); ids from it up to ``vocab_size`` are
    padding, their logits are -inf (never predicted, no share of the loss). None: no padding.
    """

    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    vocab_size: int = 257
    dropout: float = 0.0
    bias: bool = False
    token_vocab_size: int | None = None

    @property
    def n_token_ids(self) -> int:
        """Ids a model may read or emit: token_vocab_size, else vocab_size."""
        return self.vocab_size if self.token_vocab_size is None else self.token_vocab_size

    def validate(self) -> "ModelConfig":
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"model.{name} must be a positive integer, got {value!r}")
        tv = self.token_vocab_size
        if tv is not None and (not isinstance(tv, int) or isinstance(tv, bool) or not 0 < tv <= self.vocab_size):
            raise ValueError(f"model.token_vocab_size must be in 1..vocab_size ({self.vocab_size}), got {tv!r}")
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

DELTA_SCHEMES = ("none", "bf16", "int8", "int4", "sign", "ternary", "tsign")  # == common.compression.SCHEMES
DOWNLINKS = ("auto", "relay", "combine", "recode", "count")
COUNT_RULES = ("majority", "mean")  # compression.count_rule  # "auto": count for tsign, else relay
REPLAYED_DOWNLINKS = ("relay", "combine", "count")  # workers keep an outer-momentum replica and replay versions
SYNC_SCHEDULES = ("auto", "doubling", "halving", "allgather", "scatter", "count")  # worker/allreduce.py ALGORITHMS


@dataclass
class ModelSection:
    """The [model] table: a preset plus optional overrides of ModelConfig fields."""

    # validated by model_config / RunConfig.validate, whose error lists the presets
    preset: str = opt("nano", flag="--model", help="Model preset: " + ", ".join(MODEL_PRESETS) + ".")
    n_layer: int | None = opt(None, low=1, help="Transformer blocks (default: the preset's).")
    n_head: int | None = opt(None, low=1, help="Attention heads (default: the preset's).")
    n_embd: int | None = opt(None, low=1, help="Embedding width (default: the preset's).")
    block_size: int | None = opt(None, low=1, help="Context length in tokens (default: the preset's).")
    dropout: float | None = opt(None, low=0.0, high=1.0, help="Dropout probability (default: the preset's).")
    bias: bool | None = opt(None, help="Biases in linear layers and layer norms (default: the preset's).")
    # Start from GPT-2 weights in Hugging Face format: gpt2 | gpt2-medium | gpt2-large | gpt2-xl
    # (downloaded when online) or a local directory with config.json + model.safetensors. The
    # shape then comes from its config.json (common/hf.py); "" = a fresh model of the preset.
    init_from: str = opt("", help="Start from GPT-2 weights in Hugging Face format: gpt2, gpt2-medium, gpt2-large, "
                                  "gpt2-xl (downloaded when online) or a directory with config.json + model.safetensors.")

    def build(self, vocab_size: int) -> ModelConfig:
        """The model for data of ``vocab_size`` ids (the manifest's): the embedding padded to a
        multiple of VOCAB_MULTIPLE, the padding masked (ModelConfig.token_vocab_size)."""
        overrides = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("preset", "init_from")}
        return model_config(self.preset, vocab_size=padded_vocab_size(vocab_size), token_vocab_size=vocab_size,
                            **overrides)


@dataclass
class DataSection:
    """Where the token shards live. Empty dir means the embedded default corpus."""

    dir: str = opt("", flag="--data", help="Prepared data directory ('' = the embedded default corpus).")


@dataclass
class OptimConfig:
    """Inner optimizer (AdamW) and learning-rate schedule: linear warmup, cosine decay to min_lr.

    Defaults follow nanoGPT's Shakespeare-char recipe.
    """

    lr: float = opt(1e-3, low=0.0, low_open=True, help="Peak learning rate.")
    min_lr: float = opt(1e-4, low=0.0, help="Learning rate at the end of the cosine decay.")
    warmup_iters: int = opt(100, low=0, help="Linear warmup steps.")
    lr_decay_iters: int | None = opt(None, low=1, help="Cosine decay ends here (default: max-iters).")
    weight_decay: float = opt(0.1, low=0.0, help="AdamW weight decay.")
    beta1: float = opt(0.9, low=0.0, high=1.0, help="AdamW beta1.")
    beta2: float = opt(0.99, low=0.0, high=1.0, help="AdamW beta2.")
    grad_clip: float = opt(1.0, low=0.0, help="Global gradient-norm clip; 0 disables clipping.")

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
    """The reference single-process trainer (`geotrain train`).

    In an async run (sent to the workers with the run config) batch_size is the workers' default
    batch, max_iters the length of their lr schedule and seed the model's init and the data order;
    device and threads are each worker's own (`worker --device --threads`), evaluation and
    checkpoints the coordinator's ([eval], [checkpoint]), so eval_interval, eval_iters,
    log_interval and checkpoint_interval serve `geotrain train` only. grad_accum and compile
    would change what a worker computes: the coordinator refuses them (validate_for_workers).
    """

    # the positive integers below are checked by validate() (its message names the field)
    batch_size: int = opt(12, help="Sequences per step (per micro-batch).")
    # Honoured by `geotrain train` only: async workers and sync groups step once per batch, so the
    # coordinator refuses a run with grad_accum != 1 (RunConfig.validate_for_workers).
    grad_accum: int = opt(1, help="Micro-batches per optimizer step (geotrain train only).")
    max_iters: int = opt(2000, help="Optimizer steps; the lr schedule decays over them.")
    eval_interval: int = opt(250, help="Steps between validation passes.")
    eval_iters: int = opt(200, help="Validation batches per pass.")
    log_interval: int = opt(10, low=1, help="Steps between log lines.")
    checkpoint_interval: int = opt(250, low=1, help="Steps between checkpoints.")
    seed: int = opt(1337, help="Seed of the initial model and the data order.")
    device: str = opt("auto", help="auto, cpu, cuda, cuda:N or mps.")
    # Honoured by `geotrain train` only (workers run eager: the coordinator refuses compile = true).
    compile: bool = opt(False, help="torch.compile the model (geotrain train only).")
    threads: int = opt(0, low=0, help="torch intra-op threads on CPU (0 = torch's default).")
    # One training step (common/step.py, common/memplan.py). batch_size is the sequences per inner
    # step on a device; the step runs them as micro-batches of `micro_batch` sequences (0 = auto:
    # the largest that fits, probed on CUDA; the full batch on CPU).
    micro_batch: int = opt(0, auto="auto", low=1, help="Sequences per forward/backward; auto = the memory plan's (probed on CUDA).")
    activation_checkpointing: str = opt("auto", choices=("auto", "on", "off"),
                                        help="Recompute each block's activations in backward; auto = when the plan needs it.")
    optimizer_state: str = opt("auto", choices=("auto", "fp32", "8bit", "offload"),
                               help="AdamW state: fp32, 8bit (bitsandbytes, CUDA) or offload (host memory); auto = by the plan.")
    prefetch: int = 2  # batches prepared ahead by a background thread (pinned on CUDA); 0 = none

    def validate(self) -> "TrainConfig":
        for name in ("batch_size", "grad_accum", "max_iters", "eval_interval", "eval_iters"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.micro_batch < 0 or self.prefetch < 0:
            raise ValueError(f"train.micro_batch and train.prefetch must be >= 0, got {self.micro_batch}, {self.prefetch}")
        if self.activation_checkpointing not in ("auto", "on", "off"):
            raise ValueError(f"train.activation_checkpointing must be auto, on or off, got {self.activation_checkpointing!r}")
        if self.optimizer_state not in ("auto", "fp32", "8bit", "offload"):
            raise ValueError(f"train.optimizer_state must be auto, fp32, 8bit or offload, got {self.optimizer_state!r}")
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

    kind: str = opt("nesterov", flag="--outer-kind", choices=("nesterov", "average"), help="Outer optimizer.")
    lr: float = opt(0.8, flag="--outer-lr", low=0.0, low_open=True, help="Outer learning rate.")
    momentum: float = opt(0.8, flag="--outer-momentum", low=0.0, high=1.0, help="Outer Nesterov momentum.")
    # Count merges (downlink "count") of N > 2 one-bit deltas: a larger immediate step
    # lr x (1 + momentum), x sqrt(min(N, 4) / 2), at the same total lr / (1 - momentum): 1.2 / 0.7
    # from 4 deltas (common/merge.py count_step). lr and momentum above: merges of 1 or 2 deltas
    # and majority merges (compression.count_rule "majority", the default), which need no scaling.
    count_scaling: bool = opt(True, help="Exact-count merges of more than 2 deltas take a larger immediate outer step.")

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

    steps: int = opt(32, flag="--round-steps", low=0, help="Inner steps per local round (0: time-based, see --round-seconds).")
    seconds: float = opt(0.0, flag="--round-seconds", low=0.0,
                         help="Seconds per local round, used when round steps are 0 (a flag alone implies it).")
    # Inner steps a worker may train past its push before it waits for that push's merge (0: no
    # limit, the worker never waits). The steps trained on the old basepoint while a merge is in
    # flight cost quality (README: merge lag); a small bound trades a little waiting for it.
    max_lag_steps: int = opt(0, low=0, help="Steps a worker may train past its push before it waits for the merge (0 = never waits).")
    # A round of `steps` also ends after time_cap x steps x the fastest worker's step time, so a
    # slower worker pushes with the fastest instead of holding up the semi-sync merge
    # (coordinator/pacing.py; 0 = rounds of steps only). At equal speeds a worker a little slower
    # than the fastest pushes a step or two early, at the same moment as the others.
    time_cap: float = opt(1.0, low=0.0, help="A round of steps also ends after this many times its steps at the fastest worker's step time (0 = never).")
    # While 3 or more deltas merge per round (async workers and sync groups pushing now), rounds
    # last round(steps x many_scale) steps: more workers average more noisy local trajectories,
    # and their majority merges cost fewer bytes per worker against DDP's traffic than a pair's
    # merge. Measured (benchmarks/README.md, "The outer step of a majority merge, and shorter
    # rounds from 3 workers"): 4 workers at 24 steps instead of 32 closed most of the gap to the
    # DDP-equivalent at more than 1000x less traffic than DDP; 2 workers keep 32.
    many_scale: float = opt(0.75, low=0.0, low_open=True, high=1.0,
                            help="Rounds while 3 or more workers push last round steps x this (1 = the same).")

    def steps_for(self, pushers: int) -> int:
        """Inner steps per round while `pushers` deltas merge per round (0 for time-based rounds).
        The coordinator sends it in every HeartbeatReply (round_steps)."""
        if self.steps <= 0 or pushers < 3:
            return self.steps
        return max(1, round(self.steps * self.many_scale))

    def validate(self) -> "RoundConfig":
        if self.steps <= 0 and self.seconds <= 0:
            raise ValueError("round needs steps > 0 or seconds > 0")
        if not isinstance(self.max_lag_steps, int) or self.max_lag_steps < 0:
            raise ValueError(f"round.max_lag_steps must be an int >= 0, got {self.max_lag_steps!r}")
        if not 0.0 < self.many_scale <= 1.0:  # NaN fails too
            raise ValueError(f"round.many_scale must be in (0, 1], got {self.many_scale!r}")
        if not (self.time_cap == 0.0 or self.time_cap >= 1.0):  # NaN fails both
            raise ValueError(f"round.time_cap must be 0 (off) or >= 1 (the fastest worker's full round), got {self.time_cap!r}")
        return self


# The derived semi-sync timeout: this many median round times, never below the minimum (seconds);
# a worker slower than 3x the median is not worth the others' wait.
SEMI_SYNC_TIMEOUT_FACTOR = 3.0
SEMI_SYNC_TIMEOUT_MIN_S = 10.0


@dataclass
class MergeConfig:
    """How the coordinator merges deltas.

    policy "async": apply each delta as it arrives. "semi-sync": collect from all live workers up
    to semi_sync_timeout seconds, then apply them together.
    """

    policy: str = opt("semi-sync", flag="--merge-policy", choices=("async", "semi-sync"), help="When deltas merge.")
    max_staleness: int = 8  # versions; an older delta is refused (FAILED_PRECONDITION)
    # seconds; 0 = derived: SEMI_SYNC_TIMEOUT_FACTOR x the median measured round time, at least
    # SEMI_SYNC_TIMEOUT_MIN_S; before any round was measured, first_semi_sync_timeout
    semi_sync_timeout: float = 0.0
    # seconds a semi-sync merge waits before the first round time is known (it includes the
    # workers' model download and first steps, hence longer than the derived minimum)
    first_semi_sync_timeout: float = 30.0
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

    # Default tsign + downlink count, 30-step rounds, last deltas int4 (benchmarks/README.md, "The
    # compressed default"): 4 workers exchange about 1000x less than fp32 data parallelism.
    scheme: str = opt("tsign", flag="--compression", choices=DELTA_SCHEMES, help="Delta codec (common/compression.py).")
    # values per scale of the chunked schemes: async workers' deltas, the coordinator's downlink
    # and sync groups' all-reduce buffers
    chunk: int = 256
    zstd_level: int = 3
    # How a merged version reaches the workers ("auto", the default: count with scheme tsign,
    # relay with any other; validate() resolves it, so the run spec names the one in use):
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
    downlink: str = opt("auto", choices=DOWNLINKS, help="How merged versions reach the workers (README: How it works, 5).")
    # How a count merge of N >= 3 deltas reads their signs (for 2 deltas both rules are the same):
    #   majority: each value moves by the merge's scale in the direction most of the N signs take,
    #             0 on a tie (k = N x sign(sum of signs)); a worker receives one vote per value,
    #             with or against its own sign or a tie (about 1.3 bits after zstd for 4 workers
    #             instead of about 1.85 for the count of the others that agree).
    #   mean:     k = the sum of the signs (the exact mean of the N 1-bit deltas).
    # Simulated (benchmarks/README.md, "Majority votes"): the same loss as mean at 32-step rounds
    # with 18% fewer bytes per round.
    count_rule: str = opt("majority", choices=COUNT_RULES, help="How a count merge of 3 or more 1-bit deltas reads their signs.")
    # Scheme of the coordinator's payload under "combine" and "recode" ("" = `scheme`).
    downlink_scheme: str = ""
    # Scheme of a worker's last delta of the run (its final partial round, sent when its data runs
    # out) under the coarse schemes sign, tsign, ternary and int4: the error-feedback residual left
    # in its weights goes out with it, so it must not be 1-bit. int4 (default; 4 workers: the same
    # loss as int8 within noise at 6% fewer bytes per run) or int8.
    last_scheme: str = opt("int4", choices=("int8", "int4"), help="Scheme of a worker's last delta of the run.")
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
        if self.downlink == "auto":
            self.downlink = "count" if self.scheme == "tsign" else "relay"
        if self.downlink == "count" and self.scheme != "tsign":
            raise ValueError(f"compression.downlink 'count' needs compression.scheme 'tsign', got {self.scheme!r}")
        if self.count_rule not in COUNT_RULES:
            raise ValueError(f"compression.count_rule must be one of {COUNT_RULES}, got {self.count_rule!r}")
        if self.sync_schedule not in SYNC_SCHEDULES:
            raise ValueError(f"compression.sync_schedule must be one of {SYNC_SCHEDULES}, got {self.sync_schedule!r}")
        return self




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
    # With each evaluation, also HellaSwag acc_norm on the first `hellaswag_examples` examples of
    # this jsonl file (common/hellaswag.py; 0 = all), exported as geotrain_hellaswag_acc_norm.
    # "" = off. It runs on the coordinator's CPU in the evaluation thread: keep it a sample.
    hellaswag_file: str = ""
    hellaswag_examples: int = 200
    device: str = opt("cpu", flag="--eval-device",
                      help="Where the coordinator evaluates the global model (cpu, cuda, cuda:1): a GPU spares the merges.")
    max_tokens: int = 65536  # at most this many tokens per evaluation (iters shrink to fit); 0 = iters x batch


@dataclass
class DataPlanConfig:
    """How the training stream is cut into leasable work units."""

    unit_tokens: int = 65536  # tokens per work unit (one lease)
    # Near the end of max_tokens, leases shrink with each worker's share of what is left, so slow
    # and fast workers run out of data together (coordinator/pacing.py lease_cap).
    guided_leases: bool = True
    max_tokens: int = opt(0, low=0, help="Training tokens for the whole run (0 = no limit: until stopped).")


@dataclass
class WorkersConfig:
    """Membership: how often workers heartbeat and when a silent one is dropped."""

    # Sent to every worker on join (JoinReply.heartbeat_seconds); a worker falls back to this
    # default only when a reply leaves it 0.
    heartbeat_seconds: float = 2.0
    lease_seconds: float = 20.0  # no heartbeat for this long: dropped, its data returns to the pool
    max_workers: int = 256
    history_versions: int = 64  # merged updates kept in memory for workers catching up
    history_fraction: float = 1.0  # ... and at most this fraction of the model's fp32 bytes, in (0, 1]


@dataclass
class SyncConfig:
    """Sync groups' training (worker/sync.py SyncGroupTrainer), the same for every member of a run.

    A compressed group's first steps all-reduce at `warmup_compression` into one shared AdamW step
    while the Adam moments settle, then switch to 1-bit directions.
    """

    # in (0, 1): that fraction of train.max_iters; a whole number >= 1: that many steps
    compression_warmup: float = opt(0.25, flag="--sync-warmup", low=0.0, low_open=True,
                                    help="Sync groups' warmup before 1-bit: a fraction of max-iters (< 1) or whole steps (>= 1).")
    warmup_compression: str = opt("int8", flag="--sync-warmup-compression", choices=("int8", "none"),
                                  help="How sync groups all-reduce during the warmup: int8 or none (fp32).")
    variance_probe_every: int = 8  # steps between second-moment probes (0: no correction)
    variance_refresh_every: int = 0  # after warmup, every Nth step is an fp32 AdamW step (0: never)
    check_every: int = 0  # steps between checksum rounds; 0 = round.steps (10 for time-based rounds)

    def validate(self) -> "SyncConfig":
        w = self.compression_warmup
        if not (0 < w < 1 or (w >= 1 and float(w).is_integer())):
            raise ValueError(f"sync.compression_warmup must be a fraction in (0, 1) or whole steps >= 1, got {w!r}")
        if self.warmup_compression not in ("int8", "none"):
            raise ValueError(f"sync.warmup_compression must be 'int8' or 'none', got {self.warmup_compression!r}")
        for name in ("variance_probe_every", "variance_refresh_every", "check_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"sync.{name} must be >= 0, got {getattr(self, name)!r}")
        return self

    def warmup(self) -> int | float:
        """The SyncGroupTrainer's compression_warmup: a float fraction below 1, else whole steps."""
        w = self.compression_warmup
        return float(w) if w < 1 else int(w)


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
    sync: SyncConfig = field(default_factory=SyncConfig)

    def validate(self) -> "RunConfig":
        self.sync.validate()
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

    def validate_for_workers(self) -> "RunConfig":
        """The coordinator's check: refuse what async workers and sync groups do not honour."""
        self.validate()
        if self.train.grad_accum != 1:
            raise ValueError(f"train.grad_accum = {self.train.grad_accum}: workers step once per batch "
                             "(set train.batch_size, or a worker's --batch-size, instead)")
        if self.train.compile:
            raise ValueError("train.compile = true: workers train eagerly (torch.compile is for geotrain train)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- host-local options
# Options of one process, not part of the run: flags and GEOTRAIN_* variables only.

PORT_MAX = 65535
COORDINATOR_PORT = 50051
COORDINATOR_METRICS_PORT = 9090
WORKER_PORT = 10000
WORKER_METRICS_PORT = 9100
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass
class CoordinatorConfig:
    """The `coordinator` process: where it listens and keeps its run."""

    run_dir: str = opt("runs/coordinator", help="Checkpoints, history and summary; an existing run here is resumed.")
    host: str = opt("0.0.0.0", help="Address to listen on.")
    port: int = opt(COORDINATOR_PORT, low=0, high=PORT_MAX, help="gRPC port (0 = any free port).")
    metrics_port: int = opt(COORDINATOR_METRICS_PORT, low=0, high=PORT_MAX, help="Prometheus metrics HTTP port; 0 = off.")
    token_file: str | None = opt(None, path=True, help="File with the run token (or GEOTRAIN_TOKEN).")
    token: str | None = opt(None, hidden=True, help="The run token (prefer --token-file).")
    tls_cert: str | None = opt(None, path=True, help="PEM certificate: serve TLS (with --tls-key).")
    tls_key: str | None = opt(None, path=True, help="PEM private key of --tls-cert.")
    port_file: str | None = opt(None, path=True, hidden=True, help="Write the bound port here once listening (for --port 0).")
    log_level: str = opt("info", choices=LOG_LEVELS, case_sensitive=False, help="Logging level.")


# Worker timing defaults (seconds); tests shorten them through WorkerConfig.
LONG_POLL_SECONDS = 20.0  # GetModel wait while the worker's push awaits its merge
SHUTDOWN_PATIENCE_S = 15.0  # on a signal: how long to try the final push and Leave
FINISH_PATIENCE_S = 120.0  # run finished (exhausted / STOP): wait for the last merge and push
SUMMARY_SECONDS = 10.0  # between the worker's summary log lines


@dataclass
class WorkerConfig:
    """One `worker` process: the coordinator it joins and how it trains on this host."""

    coordinator: str = opt(required=True, metavar="HOST:PORT", help="The coordinator's address.")
    port: int = opt(WORKER_PORT, low=0, high=PORT_MAX,
                    help="Port of this worker's gRPC server (health, Ping, sync-group peers); 0 = any free port.")
    name: str = opt("", help="Worker name shown in status (default: hostname-pid).")
    device: str = opt("auto", help="auto | cuda | cuda:N | cpu.")
    batch_size: int = opt(0, auto="auto", low=1, help="Sequences per inner step and device; auto = the run's train.batch_size.")
    nproc_per_node: int = opt(0, auto="auto", low=1,
                              help="Processes, one per device, that train as this one participant (their batches add up); "
                                   "auto = every visible CUDA GPU, 1 on CPU.")
    threads: int = opt(0, low=0, help="torch intra-op threads (0 = torch's default).")
    cache_dir: str | None = opt(None, help="Shard cache; shards go to CACHE_DIR/<run_id>. Default ~/.cache/geotrain/shards.")
    token: str | None = opt(None, help="Run token (prefer the environment variable or --token-file over the command line).")
    token_file: str | None = opt(None, path=True, help="File whose first line is the run token.")
    tls_ca_file: str | None = opt(None, flag="--tls-ca", path=True,
                                  help="PEM CA certificate: talk TLS to the coordinator (and, with --tls-cert, to sync-group peers).")
    tls_cert_file: str | None = opt(None, flag="--tls-cert", path=True,
                                    help="PEM certificate of this worker: serve --port over TLS (sync-group peers need --tls-ca).")
    tls_key_file: str | None = opt(None, flag="--tls-key", path=True, help="PEM private key of --tls-cert.")
    metrics_port: int = opt(WORKER_METRICS_PORT, low=0, high=PORT_MAX, help="Prometheus metrics HTTP port; 0 = off.")
    # A taken `port` / `metrics_port` is replaced by a free one (logged) when True (the CLI sets it
    # for a port left at its default); False: a taken port is an error naming it (PortInUse).
    port_fallback: bool = False
    metrics_port_fallback: bool = False
    advertise_host: str = opt("", help="Host peers use to reach --port (behind NAT).")
    advertise_port: int = opt(0, low=0, high=PORT_MAX, help="Port peers use to reach --port (default: the bound port).")
    sync_group: str = opt("", help="Sync group name or 'auto' ('' = async worker).")
    sync_compression: str = opt("", choices=("", "none", "sign"),
                                help="Sync-group all-reduce compression ('' = sign: 1 bit + error feedback after an int8 warmup; none = fp32).")
    log_level: str = opt("info", choices=LOG_LEVELS, case_sensitive=False, help="Logging level.")
    # Relative speed in (0, 1]: every inner step is stretched to 1/speed of its duration by a sleep
    # (worker/throttle.py), a stand-in for a slower GPU in demos and benchmarks.
    speed: float = opt(1.0, low=0.0, low_open=True, high=1.0,
                       help="Train at this fraction of the host's speed (demo and benchmarks: sleeps after each step).")
    tls_ca: bytes | None = None  # the PEM of tls_ca_file, read by the CLI
    tls_cert: bytes | None = None  # the PEMs of tls_cert_file / tls_key_file: serve --port (and peers) over TLS
    tls_key: bytes | None = None
    long_poll_seconds: float = LONG_POLL_SECONDS
    shutdown_patience: float = SHUTDOWN_PATIENCE_S
    finish_patience: float = FINISH_PATIENCE_S
    summary_seconds: float = SUMMARY_SECONDS
    serve: bool = True  # start the worker's own gRPC server (False: unit tests drive the runner)


@dataclass
class DemoConfig:
    """`geotrain demo`: a coordinator and N workers as processes on loopback. The run's own
    defaults (model, seed, batch size) are RunConfig's."""

    workers: int = opt(2, low=1, high=64, help="Worker processes.")
    model: str = opt(ModelSection.preset, help="Model preset: " + ", ".join(MODEL_PRESETS) + ".")
    data: str = opt("", help="Prepared data directory (default: the embedded corpus).")
    config: str | None = opt(None, path=True, help="Run config TOML.")
    steps: int = opt(500, low=1, help="Inner steps per worker: sets the token budget (workers x steps x batch x block).")
    tokens: int = opt(0, low=0, help="Token budget (overrides --steps).")
    minutes: float = opt(0.0, low=0.0, help="Stop after this many minutes (0 = no cap).")
    compression: str | None = opt(None, choices=DELTA_SCHEMES, help="Delta codec (default: the run config's).")
    round_steps: int | None = opt(None, low=1, help="Inner steps per local round (default: the run config's).")
    run_dir: str = opt("runs/demo", help="The run's directory (logs, checkpoints, summary.json).")
    seed: int = opt(TrainConfig.seed, help="Seed of the run.")
    batch_size: int = TrainConfig.batch_size  # per worker
    sync: bool = opt(False, help="Train the workers as one sync group (--workers a power of two).")
    speeds: str = opt("", metavar="S1,S2,...",
                      help="Relative speed of each worker in (0, 1], e.g. 1,1,0.5,0.25 (a sleep stretches each step; default all 1).")
    json: bool = opt(False, help="Print the summary as JSON.")
    quiet: bool = False  # no progress lines
    extra_coordinator_args: list[str] = field(default_factory=list)


@dataclass
class SampleConfig:
    """`geotrain sample`: generate text from a checkpoint."""

    checkpoint: str = opt(required=True, help="Trainer out dir, checkpoint root or one ckpt-* directory.")
    prompt: str = opt("\n", help="Start text ('' starts from end-of-text).")
    max_new_tokens: int = opt(200, low=0, help="Tokens to generate.")
    temperature: float = opt(0.8, low=0.0, low_open=True, help="Softmax temperature.")
    top_k: int = opt(200, low=0, help="Keep the k most likely tokens; 0: no top-k cut.")
    num_samples: int = opt(1, low=1, help="Independent samples.")
    seed: int = opt(TrainConfig.seed, help="Sampling seed.")
    device: str = opt(TrainConfig.device, help="auto, cpu, cuda, cuda:N or mps.")


@dataclass
class EvalCheckpointConfig:
    """`geotrain eval`: validation loss of a checkpoint, batches like the trainer's evaluation."""

    checkpoint: str = opt(required=True, help="Trainer out dir, checkpoint root or one ckpt-* directory.")
    data: str | None = opt(None, help="Data directory (default: the checkpoint's).")
    iters: int = opt(TrainConfig.eval_iters, low=1, help="Validation batches.")
    batch_size: int = opt(TrainConfig.batch_size, low=1, help="Sequences per batch.")
    seed: int | None = opt(None, help="Batch seed (default: the trainer's fixed evaluation seed).")
    device: str = opt(TrainConfig.device, help="auto, cpu, cuda, cuda:N or mps.")
    json: bool = opt(False, help="Print the result as JSON.")


@dataclass
class StatusConfig:
    """`geotrain status`: one coordinator's status table."""

    json: bool = opt(False, help="Print the Status RPC's status_json (strict JSON: NaN, e.g. no validation loss yet, as null).")
    token_file: str | None = opt(None, path=True, help="File with the run token (or GEOTRAIN_TOKEN).")
    token: str | None = opt(None, hidden=True, help="The run token (prefer --token-file).")
    tls_ca: str | None = opt(None, path=True, help="PEM CA certificate: talk TLS to the coordinator.")
    timeout: float = opt(10.0, low=0.0, low_open=True, help="Seconds.")


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


# Named bundles of defaults (`--recipe NAME`), below a config file and flags in precedence.
# finetune: nanoGPT's finetune_shakespeare (from GPT-2 weights, `--init-from`): a small constant
# learning rate, no warmup or decay, few iterations of 32 accumulated sequences, frequent evaluation.
RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "finetune": {
        "optim": {"lr": 3e-5, "min_lr": 3e-5, "warmup_iters": 0, "beta2": 0.95},
        "train": {"batch_size": 1, "grad_accum": 32, "max_iters": 20, "eval_interval": 5, "eval_iters": 40},
    },
}


def load_run_config(path: str | Path | None, recipe: str | None = None) -> RunConfig:
    """Read a run TOML file into a RunConfig (defaults when path is None), on top of a recipe,
    checked on a copy: what depends on other fields (compression.downlink "auto") is resolved by
    the validate() that follows the caller's flags, which may still change them (--compression none)."""
    if recipe and recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {sorted(RECIPES)}")
    values: dict[str, Any] = {k: dict(v) for k, v in RECIPES[recipe].items()} if recipe else {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file not found: {path}")
        try:
            from_file = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"config file {path} is not valid TOML: {exc}") from exc
        for key, value in from_file.items():
            if isinstance(value, Mapping) and isinstance(values.get(key), dict):
                values[key].update(value)
            else:
                values[key] = value
    run = _fill(RunConfig, values, "")
    copy.deepcopy(run).validate()
    return run


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
