"""Round simulator: N model replicas in ONE process, merged with the real coordinator/worker code.

Each replica trains on its own deterministic stream (get_batch("train", 12, 64, seed=1000+rank,
step=s)) with AdamW at lr_at(step, optim, steps). Every H steps (synchronous rounds):

  uplink   delta_i = params_i - base; blob, dec_i = encode_tensors(delta_i, scheme)   (no feedback
           buffer: as worker/runner.py, the compression error stays in params_i - base)
  merge    mean = geotrain.common.merge.combine(...); U = OuterOptimizer.update(mean)
  downlink blob, U_dec = encode_tensors(U, scheme, feedback=ErrorFeedback)  (as coordinator/merger.py)
           global += U_dec
  rebase   params_i += U_dec - dec_i; base = global      (worker/rebase.py::apply_update)

With --delay D the update lands D inner steps after the push (the real worker keeps training while
its push is merged); D = 0 is the synchronous case. --warmup-rounds W sends the first W rounds with
--warmup-scheme (e.g. none or int8) before switching to --compression. Baselines: --mode single
(one replica alone, batch 12) and --mode ddp (one model, batch 12 x N, the same tokens the N
replicas see). The final global model is evaluated on fixed val batches (--eval-batches of 12 x 64).

  .venv/bin/python benchmarks/sim_rounds.py --workers 2 --round-steps 50 --compression sign --steps 600
  .venv/bin/python benchmarks/sim_rounds.py --sweep default --steps 600 --jobs 4 --out benchmarks/results/sim.json
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

BATCH, BLOCK = 12, 64
EVAL_SEED = 0xBE7C4


@dataclass
class SimConfig:
    mode: str = "diloco"  # diloco | single | ddp
    workers: int = 2
    round_steps: int = 50
    steps: int = 600
    compression: str = "none"
    chunk: int = 256
    sign_scale: str = "mean_abs"
    outer_kind: str = "nesterov"
    outer_lr: float = 0.8  # common/config.py OuterConfig defaults
    outer_momentum: float = 0.8
    warmup_rounds: int = 0
    warmup_scheme: str = "none"
    delay: int = 0
    down_scheme: str = ""  # the downlink's scheme ("" = the uplink's)
    down_predict: float = 0.0  # downlink sends U - p * (previous decoded U); receivers add p * previous back
    down_mode: str = "update"  # update: the coordinator codes U; delta: it codes the mean delta D and
    #                            every replica applies the same outer step to the decoded D exactly
    eager: str = "off"  # off | prev | own | mix: where replicas stand during the delay (see push_and_move)
    up_keep: float = 1.0  # < 1: the uplink sends the signs of a random share of each delta (seeded per
    #                       push, so receivers regenerate the positions), one mean-|x| scale per
    #                       up_group kept values; the rest stays in the replica's weights (error feedback)
    up_group: int = 512
    up_shared: str = ""  # "", "row" or "tensor": the shared scale's granularity  # uplink signs scaled by a per-row scale every replica knows in advance (the
    #                          mean of the replicas' own mean-|x| row scales of the previous round), so
    #                          pushes carry no scales and the exact merge is a count of signs per value;
    #                          downlink bytes are then those of each replica's zstd-coded count of the
    #                          others' + signs (lossless), whatever --down-scheme says
    shared_from: str = "round"  # --up-shared scales: "round" = the mean of this round's own scales (as
    #                             coordinator/state.py's count merge), "previous" = the previous round's
    last_scheme: str = ""  # the final partial round's scheme ("" = the run's; the workers send int8 or int4)
    data_order: str = "random"  # random: get_batch windows; units: contiguous rows inside shuffled leases
    round_schedule: str = "steps"  # steps: every round_steps steps; lr: a round ends when its summed
    #                                learning rate (warmup steps counted at the peak) reaches
    #                                round_steps x the schedule's mean: short rounds at a high lr,
    #                                long ones as it decays, about as many rounds in all
    tie_break: str = ""  # --count-power 0: "momentum" = a tied value moves along the outer momentum's sign
    early_steps: int = 0  # rounds pushed before this step last early_round_steps (post-local SGD:
    early_round_steps: int = 0  #  short rounds while the loss falls fast, round_steps after)
    unit_tokens: int = 65536
    count_power: float = 1.0  # --up-shared tensor: a count k of N merges as scale x sign(k) x (|k| / N)**p
    #                           (1: the exact mean; 0: the majority sign, ties 0, its downlink a ternary code)
    sign_stats: str = ""  # --up-shared: append per-round statistics of replica 0's signs to this JSONL file
    inner_lr_scale: float = 1.0  # the inner AdamW's lr and min_lr x this (1: the recipe's)
    inner_wd_scale: float = 1.0  # the inner AdamW's weight decay x this (1: the recipe's)
    count_scaling: bool = True  # --up-shared merges take common/merge.py count_step's outer step (as the coordinator)
    seed: int = 1337
    eval_batches: int = 200

    def name(self) -> str:
        if self.mode != "diloco":
            u = f"_{self.data_order}{self.unit_tokens}" if self.data_order != "random" else ""
            i = f"_ilr{self.inner_lr_scale:g}" if self.inner_lr_scale != 1.0 else ""
            return f"{self.mode}_n{self.workers}{u}{i}_s{self.steps}"
        outer = "avg" if self.outer_kind == "average" else f"nest{self.outer_momentum:g}"
        s = f"n{self.workers}_h{self.round_steps}_{self.compression}_{outer}_lr{self.outer_lr:g}"
        if self.compression == "sign" and self.sign_scale != "mean_abs":
            s += f"_{self.sign_scale}"
        if self.chunk != 256:
            s += f"_c{self.chunk}"
        if self.warmup_rounds:
            s += f"_wu{self.warmup_rounds}{self.warmup_scheme}"
        if self.delay:
            s += f"_d{self.delay}"
        if self.up_shared and not self.count_scaling:
            s += "_nocs"
        if self.down_scheme:
            s += f"_down{self.down_scheme}"
        if self.down_mode != "update":
            s += f"_down{self.down_mode}"
        if self.down_predict:
            s += f"_pred{self.down_predict:g}"
        if self.up_keep < 1.0:
            s += f"_keep{self.up_keep:g}g{self.up_group}"
        if self.up_shared:
            s += f"_upshared{self.up_shared}" + ("_prevscales" if self.shared_from == "previous" else "")
        if self.last_scheme:
            s += f"_last{self.last_scheme}"
        if self.round_schedule != "steps":
            s += f"_rs{self.round_schedule}"
        if self.tie_break:
            s += f"_tie{self.tie_break}"
        if self.early_steps:
            s += f"_early{self.early_steps}h{self.early_round_steps}"
        if self.eager != "off":
            s += f"_eager{self.eager}"
        if self.data_order != "random":
            s += f"_{self.data_order}{self.unit_tokens}"
        if self.count_power != 1.0:
            s += f"_cp{self.count_power:g}"
        if self.inner_lr_scale != 1.0:
            s += f"_ilr{self.inner_lr_scale:g}"
        if self.inner_wd_scale != 1.0:
            s += f"_iwd{self.inner_wd_scale:g}"
        return s + f"_s{self.steps}"


_DATA = None


def data():
    global _DATA
    if _DATA is None:
        from geotrain.common.corpus import resolve_data_dir
        from geotrain.common.reader import TokenData

        _DATA = TokenData(resolve_data_dir(os.environ.get("GEOTRAIN_SIM_DATA") or None))
    return _DATA


@torch.no_grad()
def val_loss(model, batches: int, device) -> float:
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    for i in range(batches):
        x, y = data().get_batch("val", BATCH, BLOCK, seed=EVAL_SEED, step=i, device=device)
        _, loss = model(x, y)
        total += loss.double()
    model.train()
    return float(total) / batches


class UnitStream:
    """As the coordinator's ledger + worker: shuffled units of unit_tokens, read front to back in
    batches of consecutive rows (worker/runner.py::WorkerRunner.train_step); replica r takes units r, r+N, ..."""

    def __init__(self, cfg: SimConfig, rank: int, n: int):
        import random

        self.units = []
        for info in data().manifest.split("train"):
            usable = info.tokens - 1 if hasattr(info, "tokens") else len(data().tokens(info.name)) - 1
            for start in range(0, usable, cfg.unit_tokens):
                self.units.append((info.name, start, min(start + cfg.unit_tokens, usable)))
        random.Random(cfg.seed).shuffle(self.units)
        self.units = self.units[rank::n]
        self.k, self.pos = 0, self.units[0][1]
        self.shuffle_rows = cfg.data_order == "units-shuffled"
        self.rng = __import__("numpy").random.default_rng([cfg.seed, rank])

    def next(self, batch: int, dev):
        if self.shuffle_rows:  # same tokens per unit, but each batch's rows at random places in it
            name, start, end = self.units[self.k]
            if end - self.pos < batch * BLOCK:
                self.k = (self.k + 1) % len(self.units)
                self.pos = self.units[self.k][1]
                name, start, end = self.units[self.k]
            self.pos += batch * BLOCK
            arr = data().tokens(name)
            starts = self.rng.integers(start, end - BLOCK, size=batch)
            buf = torch.from_numpy(__import__("numpy").stack([arr[a : a + BLOCK + 1] for a in starts]).astype("int64"))
            return buf[:, :-1].contiguous().to(dev), buf[:, 1:].contiguous().to(dev)
        name, _, end = self.units[self.k]
        n = min(batch, (end - self.pos) // BLOCK)
        if n < 1:
            self.k = (self.k + 1) % len(self.units)
            self.pos = self.units[self.k][1]
            return self.next(batch, dev)
        arr = data().tokens(name)
        buf = torch.from_numpy(arr[self.pos : self.pos + n * BLOCK + 1].astype("int64"))
        self.pos += n * BLOCK
        return buf[:-1].view(n, BLOCK).to(dev), buf[1:].view(n, BLOCK).to(dev)


def _row_view(t: torch.Tensor, by: str) -> torch.Tensor:
    """The groups sharing one scale: rows of a 2-D tensor (by "row"), else the whole tensor."""
    if by == "tensor":
        return t.reshape(1, -1)
    return t.reshape(t.shape[0], -1) if t.dim() == 2 else t.reshape(1, -1)


def own_row_scales(delta: dict, by: str) -> dict:
    return {n: _row_view(t, by).abs().mean(1, keepdim=True) for n, t in delta.items()}


def shared_sign(delta: dict, scales: dict, by: str) -> tuple[int, dict, dict]:
    """(wire bytes, decoded, signs as +-1 int8) of --up-shared: sign bits only, times `scales`."""
    nbytes, dec, signs = 0, {}, {}
    for n, t in delta.items():
        sg = torch.where(_row_view(t, by) >= 0, 1.0, -1.0)
        dec[n] = (sg * scales[n]).view_as(t)
        signs[n] = sg.to(torch.int8).reshape(-1)
        nbytes += -(-t.numel() // 8)
    return nbytes, dec, signs


def count_code_bytes(signs: list, me: int, majority: bool = False, tie_ref: dict | None = None) -> int:
    """zstd bytes of the count of + signs among the others (values 0..N-1), 4 per byte when N <= 4;
    majority: of the merge's majority sign relative to this worker's own (agree / tie / disagree);
    tie_ref: ties take these signs (+-1 per value, known to all), so one bit per value: the merged
    direction agrees with this worker's own sign or not."""
    import numpy as np
    import zstandard

    others = [s for i, s in enumerate(signs) if i != me]
    total = 0
    for n in others[0]:
        if tie_ref is not None:
            k = sum(s[n] for s in signs)
            d = torch.where(k == 0, tie_ref[n].reshape(k.shape).to(k.dtype), torch.sign(k))
            bits = (d == signs[me][n]).numpy().astype(bool).reshape(-1)
            total += len(zstandard.ZstdCompressor(level=3).compress(np.packbits(bits).tobytes()))
            continue
        # how many of the others agree with this worker's own sign (it knows its own)
        count = sum(((o[n] == signs[me][n]).to(torch.uint8)) for o in others).numpy().astype(np.uint8)
        if majority:  # agree 0, tie 1, disagree 2: the sign of (1 + 2 x count - (N - 1)) relative to own
            t = 1 + 2 * count.astype(np.int16) - len(others)
            count = np.where(t > 0, 0, np.where(t == 0, 1, 2)).astype(np.uint8)
        if len(signs) <= 4:
            pad = (-count.size) % 4
            c = np.concatenate([count, np.zeros(pad, np.uint8)]).reshape(-1, 4)
            count = (c[:, 0] | (c[:, 1] << 2) | (c[:, 2] << 4) | (c[:, 3] << 6)).astype(np.uint8)
        total += len(zstandard.ZstdCompressor(level=3).compress(count.tobytes()))
    return total


def sign_stats(path: str, rnd: int, signs: list, prev_update: dict | None, base: dict) -> None:
    """Append one JSON line: how predictable replica 0's uplink signs are (analysis only)."""
    import numpy as np
    import zstandard

    z = zstandard.ZstdCompressor(level=3)
    n_vals = sum(t.numel() for t in signs[0].values())
    row = {"round": rnd, "values": n_vals, "raw": 0, "xor_prev": 0, "xor_wd": 0, "agree_prev": 0.0,
           "agree_wd": 0.0, "agree_others": 0.0, "per_tensor": {}}
    for n, sg in signs[0].items():
        bits = (sg > 0).numpy()
        raw = len(z.compress(np.packbits(bits).tobytes()))
        wd = (base[n].reshape(-1) < 0).numpy()  # weight decay alone moves w toward 0: + where w < 0
        xw = len(z.compress(np.packbits(bits ^ wd).tobytes()))
        aw = float((bits == wd).mean())
        if prev_update is not None:
            pu = (prev_update[n].reshape(-1) >= 0).numpy()
            xp = len(z.compress(np.packbits(bits ^ pu).tobytes()))
            ap = float((bits == pu).mean())
        else:
            xp, ap = raw, 0.5
        ao = float(np.mean([(s[n] == sg).float().mean().item() for s in signs[1:]]))
        row["raw"] += raw
        row["xor_prev"] += xp
        row["xor_wd"] += xw
        k = sg.numel() / n_vals
        row["agree_prev"] += ap * k
        row["agree_wd"] += aw * k
        row["agree_others"] += ao * k
        row["per_tensor"][n] = [sg.numel(), round(ap, 3), round(aw, 3), round(ao, 3)]
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def sparse_sign(delta: dict, keep: float, group: int, seed: int) -> tuple[int, dict]:
    """(wire bytes, decoded) of --up-keep: the signs of a seeded random `keep` share of each
    tensor's values, one float32 mean-|x| scale per `group` kept values; zeros elsewhere."""
    gen = torch.Generator().manual_seed(seed)
    nbytes, dec = 0, {}
    for name, t in delta.items():
        flat = t.reshape(-1)
        n = flat.numel()
        k = max(1, int(round(n * keep)))
        idx = torch.randperm(n, generator=gen)[:k]
        sel = flat[idx]
        groups = -(-k // group)
        padded = torch.zeros(groups * group)
        padded[:k] = sel.abs()
        counts = torch.full((groups,), float(group))
        counts[-1] = k - (groups - 1) * group
        scales = padded.view(groups, group).sum(1) / counts
        q = torch.where(sel >= 0, 1.0, -1.0) * scales.repeat_interleave(group)[:k]
        out = torch.zeros(n)
        out[idx] = q
        dec[name] = out.view_as(t)
        nbytes += -(-k // 8) + 4 * groups
    return nbytes, dec


def simulate(cfg: SimConfig, device: str = "cpu") -> dict:
    from geotrain.common.compression import ErrorFeedback, encode_tensors, get_codec
    from geotrain.common.config import OptimConfig, OuterConfig, model_config
    from geotrain.common.model import GPT, configure_optimizer
    from geotrain.common.tensors import model_tensors
    from geotrain.common.merge import Contribution, OuterOptimizer, combine
    from geotrain.common.train import lr_at

    t0 = time.monotonic()
    dev = torch.device(device)
    mcfg = model_config("nano", vocab_size=data().vocab_size)
    optim = OptimConfig()
    if cfg.inner_lr_scale != 1.0 or cfg.inner_wd_scale != 1.0:
        optim = dataclasses.replace(optim, lr=optim.lr * cfg.inner_lr_scale, min_lr=optim.min_lr * cfg.inner_lr_scale,
                                    weight_decay=optim.weight_decay * cfg.inner_wd_scale)
    torch.manual_seed(cfg.seed)
    init = GPT(mcfg)
    glob = {n: t.detach().clone().contiguous() for n, t in model_tensors(init).items()}  # CPU fp32
    n_rep = 1 if cfg.mode in ("single", "ddp") else cfg.workers
    batch = BATCH * cfg.workers if cfg.mode == "ddp" else BATCH
    models, opts = [], []
    for _ in range(n_rep):
        m = GPT(mcfg).to(dev)
        m.load_state_dict(init.state_dict())
        m.train()
        models.append(m)
        opts.append(configure_optimizer(m, optim.weight_decay, optim.lr, (optim.beta1, optim.beta2), dev))
    params = [model_tensors(m) for m in models]

    streams = [UnitStream(cfg, r, n_rep if cfg.mode == "diloco" else 1) for r in range(n_rep)]

    def train_step(i: int, step: int) -> float:
        m, o = models[i], opts[i]
        if cfg.data_order != "random":
            x, y = streams[i].next(batch, dev)
        elif cfg.mode == "ddp":  # the union of the N replicas' batches: the same tokens as N workers
            xs, ys = zip(*(data().get_batch("train", BATCH, BLOCK, seed=1000 + r, step=step, device=dev)
                           for r in range(cfg.workers)))
            x, y = torch.cat(xs), torch.cat(ys)
        else:
            x, y = data().get_batch("train", batch, BLOCK, seed=1000 + i, step=step, device=dev)
        lr = lr_at(step, optim, cfg.steps)
        for g in o.param_groups:
            g["lr"] = lr
        _, loss = m(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), optim.grad_clip)
        o.step()
        o.zero_grad(set_to_none=True)
        return float(loss.detach()) if step % 50 == 0 else float("nan")

    up_bytes = down_bytes = 0
    rounds = 0
    curve = []
    if cfg.mode != "diloco":
        for s in range(cfg.steps):
            train_step(0, s)
        final = models[0]
    else:
        shapes = {n: tuple(t.shape) for n, t in glob.items()}
        outer = OuterOptimizer(OuterConfig(cfg.outer_kind, cfg.outer_lr, cfg.outer_momentum,
                                           count_scaling=cfg.count_scaling), shapes)
        feedback: dict[str, ErrorFeedback] = {}
        base = {n: t.clone() for n, t in glob.items()}
        H = cfg.round_steps

        prev_down: dict = {}  # the last decoded downlink update (--down-predict)
        shared_scales: dict = {}  # --up-shared: this round's row scales, known to every replica

        def push_and_merge(step: int, final: bool = False) -> tuple:
            nonlocal up_bytes, down_bytes, rounds
            scheme = cfg.warmup_scheme if rounds < cfg.warmup_rounds else cfg.compression
            if final and cfg.last_scheme:
                scheme = cfg.last_scheme
            shared = cfg.up_shared and rounds >= cfg.warmup_rounds and not (final and cfg.last_scheme)
            contribs, decs, all_signs, row_scales = [], [], [], []
            up_before = up_bytes
            deltas = [{n: (params[i][n].detach().float().cpu() - base[n]).contiguous() for n in glob}
                      for i in range(n_rep)]
            round_scales: dict = {}
            if shared and cfg.shared_from == "round":  # every delta at the mean of this round's own scales
                own = [own_row_scales(d, cfg.up_shared) for d in deltas]
                round_scales = {n: sum(o[n] for o in own) / n_rep for n in own[0]}
            for i in range(n_rep):
                delta = deltas[i]
                if shared:
                    row_scales.append(own_row_scales(delta, cfg.up_shared))
                    use = round_scales or shared_scales or row_scales[-1]
                    nbytes, dec, sg = shared_sign(delta, use, cfg.up_shared)
                    own_scale_bytes = 4 * sum(v.numel() for v in use.values())
                    up_bytes += nbytes + (own_scale_bytes if round_scales or not shared_scales else 0)
                    all_signs.append(sg)
                elif cfg.up_keep < 1.0 and rounds >= cfg.warmup_rounds:
                    nbytes, dec = sparse_sign(delta, cfg.up_keep, cfg.up_group, seed=rounds * 1000 + i)
                    up_bytes += nbytes
                else:
                    blob, dec = encode_tensors(delta, scheme, cfg.chunk, sign_scale=cfg.sign_scale)
                    up_bytes += len(blob)
                decs.append({n: t.clone() for n, t in dec.items()})
                contribs.append(Contribution(f"p{rounds}-{i}", f"w{i}", rounds, BATCH * BLOCK * H, H, 0.0, decs[-1]))
            down = cfg.down_scheme or scheme
            if all_signs and cfg.sign_stats:
                sign_stats(cfg.sign_stats, rounds, all_signs, last_update, base)
            if all_signs:  # the next round's shared scales; the exact merge as a count code
                shared_scales.clear()
                shared_scales.update({n: sum(r[n] for r in row_scales) / len(row_scales) for n in row_scales[0]})
                tie_ref = None
                if cfg.tie_break == "momentum":  # ties move along the outer momentum (+ where it is 0)
                    assert cfg.count_power == 0 and cfg.outer_kind == "nesterov", "--tie-break needs --count-power 0"
                    tie_ref = {n: torch.where(outer.momentum[n] < 0, -1.0, 1.0) for n in glob}
                down_bytes += count_code_bytes(all_signs, 0, majority=cfg.count_power == 0, tie_ref=tie_ref) * n_rep
                D = combine(contribs, rounds, 0.5)
                if cfg.count_power != 1.0:  # scale x sign(k) x (|k| / N)**p instead of scale x k / N
                    use = round_scales or shared_scales
                    for n in D:
                        sc = use[n].reshape(-1)[0] if cfg.up_shared == "tensor" else None
                        assert sc is not None, "--count-power needs --up-shared tensor"
                        r = D[n] / sc
                        D[n] = torch.sign(r) * r.abs().pow(cfg.count_power) * sc if cfg.count_power else torch.sign(r.round(decimals=6)) * sc
                        if tie_ref is not None:
                            D[n] = torch.where(r.round(decimals=6) == 0, tie_ref[n].reshape(r.shape) * sc, D[n])
                last_mean.clear()
                last_mean.update({n: t.clone() for n, t in D.items()})
                U_dec = {n: t.clone() for n, t in outer.update(D, counted=n_rep, majority=cfg.count_power == 0 and n_rep >= 3).items()}
                for n in glob:
                    glob[n].add_(U_dec[n])
                rounds += 1
                return U_dec, decs, step + cfg.delay
            if cfg.down_mode == "delta":  # code D, then the outer step on the decoded D is exact everywhere
                fb = feedback.get(down)
                if fb is None:
                    fb = feedback[down] = ErrorFeedback(get_codec(down, cfg.chunk, cfg.sign_scale))
                blob, D_dec = encode_tensors(combine(contribs, rounds, 0.5), down, cfg.chunk, feedback=fb,
                                             sign_scale=cfg.sign_scale)
                down_bytes += len(blob) * n_rep
                U_dec = {n: t.clone() for n, t in outer.update({n: t.clone() for n, t in D_dec.items()}).items()}
                for n in glob:
                    glob[n].add_(U_dec[n])
                rounds += 1
                return U_dec, decs, step + cfg.delay
            D = combine(contribs, rounds, 0.5)
            last_mean.clear()
            last_mean.update({n: t.clone() for n, t in D.items()})
            U = outer.update(D)
            if final and cfg.last_scheme and cfg.up_shared:  # relayed, as the count downlink does
                down_bytes += (up_bytes - up_before) * (n_rep - 1)
                U_dec = {n: t.clone() for n, t in U.items()}
                for n in glob:
                    glob[n].add_(U_dec[n])
                rounds += 1
                return U_dec, decs, step + cfg.delay
            fb = feedback.get(down)
            if fb is None:
                fb = feedback[down] = ErrorFeedback(get_codec(down, cfg.chunk, cfg.sign_scale))
            p = cfg.down_predict
            if p and prev_down:
                U = {n: U[n] - p * prev_down[n] for n in U}  # the innovation over the prediction
            blob, U_dec = encode_tensors(U, down, cfg.chunk, feedback=fb, sign_scale=cfg.sign_scale)
            down_bytes += len(blob) * n_rep
            U_dec = {n: t.clone() for n, t in U_dec.items()}
            if p and prev_down:
                U_dec = {n: U_dec[n] + p * prev_down[n] for n in U_dec}
            prev_down.clear()
            prev_down.update(U_dec)
            for n in glob:
                glob[n].add_(U_dec[n])
            rounds += 1
            return U_dec, decs, step + cfg.delay

        last_update: dict | None = None
        last_mean: dict = {}  # the last merge's mean delta (--eager mix)

        def eager_estimate(own: dict, m_before: dict, prev_mean: dict | None) -> dict:
            lr, mu, n_w = cfg.outer_lr, cfg.outer_momentum, n_rep
            out = {}
            for n, d in own.items():
                if prev_mean is not None and n in prev_mean:
                    d = d / n_w + prev_mean[n] * ((n_w - 1) / n_w)
                if cfg.outer_kind == "nesterov":
                    out[n] = (d + (m_before[n] * mu + d) * mu) * lr
                else:
                    out[n] = d * lr
            return out

        def push_and_move(step: int) -> tuple:
            """push_and_merge; with --eager prev every replica then moves from base + own delta to
            base + the last update while its push is in flight, and that becomes its offset."""
            m_before = {n: t.clone() for n, t in outer.momentum.items()}
            prev_mean = dict(last_mean)  # push_and_merge replaces last_mean with this merge's
            U, decs, at = push_and_merge(step)
            if cfg.eager in ("own", "mix") and rounds > 1:
                # the outer step each replica would take if the merge were its own delta ("own"),
                # or its own delta 1/N plus the previous merge's mean delta (N-1)/N ("mix")
                ests = [eager_estimate(decs[i], m_before, prev_mean if cfg.eager == "mix" else None)
                        for i in range(n_rep)]
                with torch.no_grad():
                    for i in range(n_rep):
                        for n in glob:
                            params[i][n].add_((ests[i][n] - decs[i][n]).to(dev))
                return U, ests, at
            if cfg.eager == "prev" and last_update is not None:
                with torch.no_grad():
                    for i in range(n_rep):
                        for n in glob:
                            params[i][n].add_((last_update[n] - decs[i][n]).to(dev))
                decs = [last_update] * n_rep
            return U, decs, at

        def apply(pending: tuple) -> None:
            nonlocal last_update
            U, decs, _ = pending
            with torch.no_grad():
                for n in glob:
                    for i in range(n_rep):
                        params[i][n].add_((U[n] - decs[i][n]).to(dev))
                    base[n].add_(U[n])
            last_update = U

        pending = None  # (update, each replica's own decoded push, step at which it lands)
        last_push = 0
        step = 0

        def weight(t: int) -> float:  # --round-schedule lr: a step's share of a round
            return optim.lr if t < optim.warmup_iters else lr_at(t, optim, cfg.steps)

        mean_w = sum(weight(t) for t in range(cfg.steps)) / cfg.steps
        acc = 0.0
        while True:
            if pending is not None and (step >= pending[2] or step >= cfg.steps):
                apply(pending)
                pending = None
            if step >= cfg.steps:
                if last_push < step:  # the final (possibly partial) round
                    apply(push_and_merge(step, final=True))
                break
            for i in range(n_rep):
                train_step(i, step)
            acc += weight(step)
            step += 1
            if cfg.round_schedule == "lr":
                due = acc >= H * mean_w
            elif cfg.early_steps:
                due = step - last_push >= (cfg.early_round_steps if last_push < cfg.early_steps else H)
            else:
                due = step % H == 0
            if due and step < cfg.steps:
                acc = 0.0
                if pending is not None:  # the worker pushes only once its last push is merged
                    apply(pending)
                pending = push_and_move(step)
                last_push = step
        # the final global model
        final = GPT(mcfg).to(dev)
        with torch.no_grad():
            for n, p in final.named_parameters():
                p.copy_(glob[n].to(dev))
    nparams = sum(t.numel() for t in glob.values())
    loss = val_loss(final, cfg.eval_batches, dev)
    tokens_per_worker = cfg.steps * BATCH * BLOCK
    per_worker = (up_bytes + down_bytes) / max(1, n_rep) if cfg.mode == "diloco" else 0
    n = cfg.workers
    ddp = 2 * 2 * (n - 1) / n * 4 * nparams * cfg.steps
    return dict(asdict(cfg), name=cfg.name(), val=loss, rounds=rounds, params=nparams,
                tokens=tokens_per_worker * (n if cfg.mode != "single" else 1),
                up_bytes=up_bytes, down_bytes=down_bytes, bytes_per_worker=per_worker,
                ddp_bytes_per_worker=ddp, ddp_ratio=(ddp / per_worker) if per_worker and n > 1 else None,
                seconds=time.monotonic() - t0, device=device)


# --------------------------------------------------------------------------- sweeps


def sweep(name: str, steps: int) -> list[SimConfig]:
    C = SimConfig
    out: list[SimConfig] = []
    if name in ("default", "outer"):
        for n in (2, 4):
            out += [C("single", 1, steps=steps), C("ddp", n, steps=steps)] if n == 2 else [C("ddp", n, steps=steps)]
            for h in (25, 50):
                for kind, lr, mom in [("average", 1.0, 0.0), ("nesterov", 0.7, 0.9), ("nesterov", 0.5, 0.9),
                                      ("nesterov", 0.7, 0.8), ("nesterov", 1.0, 0.6), ("nesterov", 0.4, 0.9)]:
                    out.append(C(workers=n, round_steps=h, steps=steps, outer_kind=kind, outer_lr=lr, outer_momentum=mom))
    if name in ("default", "compress"):
        for n, h, scheme in itertools.product((2, 4), (10, 25, 50, 100), ("none", "int8", "int4", "sign")):
            out.append(C(workers=n, round_steps=h, steps=steps, compression=scheme))
    if name in ("signfix",):
        for n, h in itertools.product((2, 4), (25, 50)):
            for kind, lr, mom in [("nesterov", 0.7, 0.9), ("average", 1.0, 0.0), ("nesterov", 0.5, 0.9)]:
                out.append(C(workers=n, round_steps=h, steps=steps, compression="sign", outer_kind=kind,
                             outer_lr=lr, outer_momentum=mom))
                out.append(C(workers=n, round_steps=h, steps=steps, compression="sign", outer_kind=kind,
                             outer_lr=lr, outer_momentum=mom, sign_scale="rms"))
            out.append(C(workers=n, round_steps=h, steps=steps, compression="sign", warmup_rounds=4, warmup_scheme="int8"))
            out.append(C(workers=n, round_steps=h, steps=steps, compression="sign", delay=5))
            out.append(C(workers=n, round_steps=h, steps=steps, compression="none", delay=5))
    # dedupe, keep order
    seen, uniq = set(), []
    for c in out:
        if c.name() not in seen:
            seen.add(c.name())
            uniq.append(c)
    return uniq


def _run_one(args: tuple[SimConfig, str, int]) -> dict:
    cfg, device, threads = args
    torch.set_num_threads(threads)
    return simulate(cfg, device)


def print_table(rows: list[dict]) -> None:
    ref = {}
    for r in rows:
        if r["mode"] == "ddp":
            ref[("ddp", r["workers"], r["steps"])] = r["val"]
        if r["mode"] == "single" and r.get("data_order", "random") == "random":
            ref[("single", r["steps"])] = r["val"]
    print("| config | val | vs DDP | vs single | MB/worker | DDP/ours | s |")
    print("|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["steps"], r["workers"], r["mode"] != "single", r["mode"] != "ddp", r["name"])):
        a = ref.get(("ddp", r["workers"], r["steps"]))
        b = ref.get(("single", r["steps"]))
        va = f"{100 * (r['val'] / a - 1):+.2f}%" if a else ""
        vb = f"{100 * (r['val'] / b - 1):+.2f}%" if b else ""
        ratio = f"{r['ddp_ratio']:.0f}x" if r.get("ddp_ratio") else "-"
        print(f"| {r['name']} | {r['val']:.4f} | {va} | {vb} | {r['bytes_per_worker'] / 1e6:.2f} | {ratio} | "
              f"{r['seconds']:.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = SimConfig()
    p.add_argument("--mode", default=d.mode, choices=["diloco", "single", "ddp"])
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--round-steps", type=int, default=d.round_steps)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--compression", default=d.compression)
    p.add_argument("--chunk", type=int, default=d.chunk)
    p.add_argument("--sign-scale", default=d.sign_scale)
    p.add_argument("--outer-kind", default=d.outer_kind)
    p.add_argument("--outer-lr", type=float, default=d.outer_lr)
    p.add_argument("--outer-momentum", type=float, default=d.outer_momentum)
    p.add_argument("--warmup-rounds", type=int, default=0)
    p.add_argument("--warmup-scheme", default="none")
    p.add_argument("--delay", type=int, default=0)
    p.add_argument("--eager", default="off", choices=["off", "prev", "own", "mix"])
    p.add_argument("--down-scheme", default="", help="the downlink's scheme (default: --compression)")
    p.add_argument("--down-predict", type=float, default=0.0, help="downlink codes U - P x previous update")
    p.add_argument("--down-mode", default="update", choices=["update", "delta"])
    p.add_argument("--up-keep", type=float, default=1.0, help="uplink: signs of this random share only")
    p.add_argument("--up-group", type=int, default=512, help="uplink with --up-keep: kept values per scale")
    p.add_argument("--up-shared", default="", choices=["", "row", "tensor"],
                   help="uplink signs with shared scales per row or tensor; count-code downlink")
    p.add_argument("--shared-from", default="round", choices=["round", "previous"],
                   help="--up-shared scales: this round's mean (as the count merge) or the previous round's")
    p.add_argument("--last-scheme", default="", help="the final partial round's scheme (int8, int4)")
    p.add_argument("--tie-break", default="", choices=["", "momentum"],
                   help="--count-power 0: ties move along the outer momentum's sign (1-bit votes)")
    p.add_argument("--early-steps", type=int, default=0,
                   help="rounds pushed before this step last --early-round-steps")
    p.add_argument("--early-round-steps", type=int, default=0)
    p.add_argument("--round-schedule", default="steps", choices=["steps", "lr"],
                   help="lr: rounds of equal summed learning rate (short at the peak, long as it decays)")
    p.add_argument("--data-order", default="random", choices=["random", "units", "units-shuffled"])
    p.add_argument("--unit-tokens", type=int, default=65536)
    p.add_argument("--count-power", type=float, default=1.0, help="--up-shared tensor: merge a count k of N as "
                   "scale x sign(k) x (|k| / N)**p (0: the majority sign, ternary downlink)")
    p.add_argument("--sign-stats", default="", help="--up-shared: per-round JSON lines on how predictable "
                   "replica 0's signs are (agreement with the previous update, the weight-decay direction, the others)")
    p.add_argument("--inner-lr-scale", type=float, default=1.0, help="the inner lr and min_lr x this")
    p.add_argument("--inner-wd-scale", type=float, default=1.0, help="the inner weight decay x this")
    p.add_argument("--no-count-scaling", dest="count_scaling", action="store_false",
                   help="--up-shared merges at --outer-lr / --outer-momentum whatever their size")
    p.add_argument("--eval-batches", type=int, default=d.eval_batches)
    p.add_argument("--sweep", default="", help="default | outer | compress | signfix (comma separated)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch threads per process")
    p.add_argument("--jobs", type=int, default=1, help="processes for a sweep")
    p.add_argument("--out", default="", help="JSON file; results are merged into it by name")
    args = p.parse_args()

    if args.sweep:
        cfgs = [c for s in args.sweep.split(",") for c in sweep(s, args.steps)]
        for c in cfgs:
            c.eval_batches = args.eval_batches
    else:
        cfgs = [SimConfig(args.mode, args.workers, args.round_steps, args.steps, args.compression, args.chunk,
                          args.sign_scale, args.outer_kind, args.outer_lr, args.outer_momentum, args.warmup_rounds,
                          args.warmup_scheme, args.delay, down_scheme=args.down_scheme, down_predict=args.down_predict, down_mode=args.down_mode, eager=args.eager,
                          up_keep=args.up_keep, up_group=args.up_group, up_shared=args.up_shared,
                          shared_from=args.shared_from, last_scheme=args.last_scheme, data_order=args.data_order, unit_tokens=args.unit_tokens,
                          round_schedule=args.round_schedule, early_steps=args.early_steps, tie_break=args.tie_break,
                          early_round_steps=args.early_round_steps, count_scaling=args.count_scaling,
                          inner_lr_scale=args.inner_lr_scale, sign_stats=args.sign_stats,
                          count_power=args.count_power, inner_wd_scale=args.inner_wd_scale,
                          eval_batches=args.eval_batches)]
    existing = {}
    if args.out and Path(args.out).exists():
        existing = {r["name"]: r for r in json.loads(Path(args.out).read_text())["runs"]}
    rows = []
    work = [(c, args.device, args.threads) for c in cfgs]
    if args.jobs > 1:
        import multiprocessing as mp

        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as ex:
            for r in ex.map(_run_one, work):
                print(json.dumps({k: r[k] for k in ("name", "val", "bytes_per_worker", "seconds")}), flush=True)
                rows.append(r)
                if args.out:
                    existing[r["name"]] = r
                    Path(args.out).write_text(json.dumps({"runs": list(existing.values())}, indent=1) + "\n")
    else:
        for w in work:
            r = _run_one(w)
            print(json.dumps({k: r[k] for k in ("name", "val", "bytes_per_worker", "seconds")}), flush=True)
            rows.append(r)
            if args.out:
                existing[r["name"]] = r
                Path(args.out).write_text(json.dumps({"runs": list(existing.values())}, indent=1) + "\n")
    print_table(list(existing.values()) if args.out else rows)


if __name__ == "__main__":
    main()
