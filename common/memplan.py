"""The memory plan of one training process: what a model needs on its device, and how to fit it.

For a model shape, the device's memory, the batch per device (sequences per inner step) and the
processes per node, the plan counts device bytes of

    weights          fp32, 4 B/param (the model stays fp32; autocast computes in bf16)
    autocast copies  bf16 casts of the weights cached for a forward under CUDA autocast, 2 B/param
    gradients        fp32, 4 B/param
    optimizer state  AdamW exp_avg + exp_avg_sq: fp32 8 B/param, 8-bit 2 B/param (bitsandbytes,
                     plus a few bytes per 2048-value block, ignored), offloaded 0 (in host memory)
    activations      of one micro-batch, see `activation_bytes`
    overhead         1 GiB: CUDA context, cuBLAS workspaces, allocator fragmentation

and chooses the micro-batch (the largest that fits, balanced over the batch), activation
checkpointing (on only when not even micro-batch 1 fits without it) and the optimizer state
(fp32, then 8-bit where bitsandbytes is importable, then offloaded to host memory). The offloaded
state needs host memory instead: fp32 master copy + gradient copy + AdamW state = 16 B/param per
process, times the processes per node.

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models", eq. 2 with no tensor parallelism) for a transformer layer with 16-bit
activations: B*T*C*(34 + 5*H*T/C) bytes per layer, B micro-batch, T sequence length, C width,
H heads. The 5*H*T/C term is the attention score matrices (B*H*T*T: scores 2 B, softmax 2 B,
dropout mask 1 B); `scaled_dot_product_attention`'s flash and memory-efficient kernels (CUDA)
never store them, so the plan drops that term when flash=True (the default). On top of the layers:
the embedding output (fp32, 4*B*T*C) and the logits B*T*V: bf16 logits 2 B, their fp32 upcast
for the loss 4 B and the fp32 log-softmax kept for backward 4 B = 10 B per value. With activation
checkpointing a layer keeps only its fp32 input (4*B*T*C) and one layer's full activations exist
at a time, while it is recomputed for its backward.

`benchmarks/gpu_check.py` measures the real peak of each preset at its planned micro-batch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from geotrain.common.config import ModelConfig

GiB = 1 << 30
OVERHEAD_BYTES = 1 * GiB
OPTIMIZER_STATES = ("fp32", "8bit", "offload")
OPTIMIZER_BYTES_PER_PARAM = {"fp32": 8, "8bit": 2, "offload": 0}
HOST_BYTES_PER_PARAM_OFFLOAD = 16  # master copy 4 + gradient copy 4 + AdamW state 8
CHECKPOINTING_CHOICES = ("auto", "on", "off")
LOGIT_BYTES = 10  # per logit value: bf16 logits 2 + fp32 upcast 4 + fp32 log-softmax 4

_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kib": 1 << 10, "kb": 10**3,
    "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
    "g": 1 << 30, "gib": 1 << 30, "gb": 10**9,
    "t": 1 << 40, "tib": 1 << 40, "tb": 10**12,
}


def parse_size(text: str) -> int:
    """'24GiB', '24GB', '24G' (= GiB), '16000MiB', '8 GB', '1073741824' -> bytes. ValueError else."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(f"bad memory size {text!r}: use a number and a unit such as 24GiB, 24GB, 16000MiB")
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"bad memory size {text!r}: must be > 0")
    return value


def fmt_bytes(n: float) -> str:
    """Bytes as GiB (or MiB below 1 GiB), one decimal."""
    return f"{n / GiB:.1f} GiB" if abs(n) >= GiB else f"{n / (1 << 20):.0f} MiB"


def count_params(cfg: ModelConfig) -> int:
    """Parameters of common/model.py's GPT for cfg, tied embedding counted once, wpe included."""
    C, V, L, T = cfg.n_embd, cfg.vocab_size, cfg.n_layer, cfg.block_size
    b = 1 if cfg.bias else 0
    ln = C * (1 + b)
    layer = 2 * ln + (3 * C * C + 3 * C * b) + (C * C + C * b) + (4 * C * C + 4 * C * b) + (4 * C * C + C * b)
    return V * C + T * C + L * layer + ln


def activation_bytes(cfg: ModelConfig, micro_batch: int, checkpointing: bool, flash: bool = True,
                     seq_len: int | None = None) -> int:
    """Activation bytes one forward of `micro_batch` sequences keeps for its backward (module doc)."""
    if micro_batch < 0:
        raise ValueError(f"micro_batch must be >= 0, got {micro_batch}")
    B, T, C, H, L, V = micro_batch, seq_len or cfg.block_size, cfg.n_embd, cfg.n_head, cfg.n_layer, cfg.vocab_size
    per_layer = B * T * C * 34 + (0 if flash else 5 * B * H * T * T)
    if checkpointing:
        layers = L * 4 * B * T * C + per_layer  # stored block inputs + one block being recomputed
    else:
        layers = L * per_layer
    return layers + 4 * B * T * C + LOGIT_BYTES * B * T * V


def balanced_micro_batch(batch: int, largest: int) -> int:
    """The micro-batch of ceil(batch / largest) equal-as-possible chunks (<= largest)."""
    largest = max(1, min(largest, batch))
    chunks = -(-batch // largest)
    return -(-batch // chunks)


@dataclass
class MemoryPlan:
    """What one process needs on its device. Bytes unless named otherwise."""

    params: int
    batch_size: int            # sequences per inner step on this device
    seq_len: int
    nproc: int                 # processes (one device each) per node
    device_bytes: int | None   # None: no device limit (CPU)
    micro_batch: int           # sequences per forward/backward; 0 when nothing fits
    checkpointing: bool
    optimizer_state: str       # fp32 | 8bit | offload
    autocast: bool             # bf16 weight copies counted
    fits: bool
    reason: str = ""           # why it does not fit, naming what would be needed
    parts: dict[str, int] = field(default_factory=dict)  # name -> device bytes

    @property
    def total_bytes(self) -> int:
        return sum(self.parts.values())

    @property
    def host_bytes(self) -> int:
        """Host memory of the node for the offloaded optimizer (all nproc processes)."""
        per = HOST_BYTES_PER_PARAM_OFFLOAD * self.params if self.optimizer_state == "offload" else 0
        return per * self.nproc

    @property
    def grad_accum(self) -> int:
        return -(-self.batch_size // self.micro_batch) if self.micro_batch else 0

    def table(self, title: str = "") -> str:
        """The plan as an aligned text table (what `geotrain plan`, the trainer and the worker print)."""
        rows = [("params", f"{self.params / 1e6:,.1f}M")]
        rows += [(name, fmt_bytes(b)) for name, b in self.parts.items()]
        rows.append(("total", fmt_bytes(self.total_bytes)))
        rows.append(("device memory", fmt_bytes(self.device_bytes) if self.device_bytes else "no limit (cpu)"))
        rows.append(("batch per device", f"{self.batch_size} x {self.seq_len} tokens"))
        rows.append(("micro-batch", f"{self.micro_batch} ({self.grad_accum} per step)" if self.micro_batch else "none fits"))
        rows.append(("activation checkpointing", "on" if self.checkpointing else "off"))
        rows.append(("optimizer", {"fp32": "AdamW, fp32 state", "8bit": "AdamW, 8-bit state (bitsandbytes)",
                                   "offload": "AdamW, state in host memory"}[self.optimizer_state]))
        if self.optimizer_state == "offload":
            rows.append(("host memory (node)", f"{fmt_bytes(self.host_bytes)} for {self.nproc} process(es)"))
        rows.append(("fits", "yes" if self.fits else f"no: {self.reason}"))
        width = max(len(k) for k, _ in rows)
        lines = [title] if title else []
        lines += [f"  {k.ljust(width)}  {v}" for k, v in rows]
        return "\n".join(lines)


def _parts(cfg: ModelConfig, n: int, micro_batch: int, ckpt: bool, state: str, autocast: bool,
           flash: bool, seq_len: int, overhead: int) -> dict[str, int]:
    parts = {"weights": 4 * n}
    if autocast:
        parts["autocast copies"] = 2 * n
    parts["gradients"] = 4 * n
    parts["optimizer state"] = OPTIMIZER_BYTES_PER_PARAM[state] * n
    parts["activations"] = activation_bytes(cfg, micro_batch, ckpt, flash, seq_len)
    parts["overhead"] = overhead
    return parts


def make_plan(
    cfg: ModelConfig,
    device_bytes: int | None,
    batch_size: int,
    *,
    seq_len: int | None = None,
    nproc: int = 1,
    micro_batch: int = 0,
    checkpointing: str = "auto",
    optimizer_state: str = "auto",
    have_8bit: bool = False,
    autocast: bool | None = None,
    flash: bool = True,
    overhead: int | None = None,
) -> MemoryPlan:
    """Plan one process: device_bytes None = no device limit (CPU: full batch, no checkpointing,
    fp32 state unless asked). micro_batch 0 = the largest that fits; checkpointing auto|on|off;
    optimizer_state auto|fp32|8bit|offload (auto tries 8bit only when have_8bit). autocast
    (default: a device limit is given, i.e. CUDA) counts the bf16 weight copies."""
    if batch_size <= 0 or nproc <= 0 or micro_batch < 0:
        raise ValueError(f"need batch_size > 0, nproc > 0, micro_batch >= 0; got {batch_size}, {nproc}, {micro_batch}")
    if checkpointing not in CHECKPOINTING_CHOICES:
        raise ValueError(f"activation checkpointing must be one of {CHECKPOINTING_CHOICES}, got {checkpointing!r}")
    if optimizer_state not in ("auto", *OPTIMIZER_STATES):
        raise ValueError(f"optimizer state must be one of {('auto', *OPTIMIZER_STATES)}, got {optimizer_state!r}")
    if device_bytes is not None and device_bytes <= 0:
        raise ValueError(f"device memory must be > 0 bytes, got {device_bytes}")
    T = seq_len or cfg.block_size
    n = count_params(cfg)
    autocast = (device_bytes is not None) if autocast is None else autocast
    overhead = (OVERHEAD_BYTES if device_bytes is not None else 0) if overhead is None else overhead
    m_req = min(micro_batch, batch_size) if micro_batch else 0

    def plan(m: int, ckpt: bool, state: str, fits: bool, reason: str = "") -> MemoryPlan:
        return MemoryPlan(params=n, batch_size=batch_size, seq_len=T, nproc=nproc, device_bytes=device_bytes,
                          micro_batch=m if fits else 0, checkpointing=ckpt, optimizer_state=state,
                          autocast=autocast, fits=fits, reason=reason,
                          parts=_parts(cfg, n, max(m, 1), ckpt, state, autocast, flash, T, overhead))

    states = [optimizer_state] if optimizer_state != "auto" else ["fp32"] + (["8bit"] if have_8bit else []) + ["offload"]
    ckpts = {"auto": [False, True], "on": [True], "off": [False]}[checkpointing]
    if device_bytes is None:  # no limit to fit: the request, else the full batch, fp32, no recompute
        return plan(m_req or batch_size, ckpts[0] if checkpointing != "auto" else False,
                    states[0] if optimizer_state != "auto" else "fp32", True)

    def largest(ckpt: bool, state: str) -> int:
        """The largest micro-batch <= batch_size that fits (0: none)."""
        fixed = sum(_parts(cfg, n, 0, ckpt, state, autocast, flash, T, overhead).values())
        lo, hi = 0, batch_size
        while lo < hi:  # activations grow with the micro-batch
            mid = (lo + hi + 1) // 2
            if fixed + activation_bytes(cfg, mid, ckpt, flash, T) <= device_bytes:
                lo = mid
            else:
                hi = mid - 1
        return lo

    for state in states:
        for ckpt in ckpts:
            m = largest(ckpt, state)
            if m_req and m >= m_req:
                return plan(m_req, ckpt, state, True)
            if not m_req and m >= 1:
                return plan(balanced_micro_batch(batch_size, m), ckpt, state, True)
    # nothing fits: name the leanest of the allowed options and what it would need
    state, ckpt, m = states[-1], ckpts[-1], m_req or 1
    need = sum(_parts(cfg, n, m, ckpt, state, autocast, flash, T, overhead).values())
    reason = (f"needs {fmt_bytes(need)} of device memory, has {fmt_bytes(device_bytes)} "
              f"(micro-batch {m}, activation checkpointing {'on' if ckpt else 'off'}, optimizer state {state})")
    return plan(m, ckpt, state, False, reason)
