"""`geotrain`: the umbrella command (prepare, train, sample, eval, demo, status).

Each subcommand maps flags (and `--config FILE.toml` where it applies) onto the typed dataclasses
of common/config.py and calls a plain function; ValueError from those becomes a clear message and
exit status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from geotrain.common import __version__
from geotrain.common.data import DEFAULT_SHARD_TOKENS
from geotrain.common.config import DELTA_SCHEMES


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="geotrain")
def cli() -> None:
    """Train GPT models on GPUs scattered over the internet."""


def fail(message: str) -> None:
    """Print a one-line error and exit 2 (callers' mistakes: bad flags, bad files)."""
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


# --------------------------------------------------------------------------- train / sample / eval

_TRAIN_FLAGS = {  # CLI option -> dotted RunConfig key
    "data": "data.dir", "model": "model.preset", "n_layer": "model.n_layer", "n_head": "model.n_head",
    "n_embd": "model.n_embd", "block_size": "model.block_size", "dropout": "model.dropout",
    "batch_size": "train.batch_size", "grad_accum": "train.grad_accum", "max_iters": "train.max_iters",
    "eval_interval": "train.eval_interval", "eval_iters": "train.eval_iters", "seed": "train.seed",
    "device": "train.device", "compile": "train.compile", "threads": "train.threads",
    "log_interval": "train.log_interval", "checkpoint_interval": "train.checkpoint_interval",
    "lr": "optim.lr", "min_lr": "optim.min_lr", "warmup_iters": "optim.warmup_iters",
    "lr_decay_iters": "optim.lr_decay_iters", "weight_decay": "optim.weight_decay",
    "beta2": "optim.beta2", "grad_clip": "optim.grad_clip", "micro_batch": "train.micro_batch",
    "activation_checkpointing": "train.activation_checkpointing", "optimizer_state": "train.optimizer_state",
}


@cli.command()
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output directory: checkpoints/, config.json, history.jsonl, summary.json.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Run config TOML; the flags below override it.")
@click.option("--resume", is_flag=True, help="Continue from the latest valid checkpoint in --out.")
@click.option("--data", help="Prepared data directory (default: the embedded corpus).")
@click.option("--model", help="Model preset: nano, gpt2, gpt2-medium, gpt2-large, gpt2-xl.")
@click.option("--n-layer", type=int)
@click.option("--n-head", type=int)
@click.option("--n-embd", type=int)
@click.option("--block-size", type=int)
@click.option("--dropout", type=float)
@click.option("--batch-size", type=int)
@click.option("--grad-accum", type=int, help="Micro-batches per optimizer step.")
@click.option("--max-iters", type=int)
@click.option("--lr", type=float, help="Peak learning rate.")
@click.option("--min-lr", type=float)
@click.option("--warmup-iters", type=int)
@click.option("--lr-decay-iters", type=int, help="Cosine decay ends here (default: max-iters).")
@click.option("--weight-decay", type=float)
@click.option("--beta2", type=float)
@click.option("--grad-clip", type=float, help="0 disables clipping.")
@click.option("--eval-interval", type=int)
@click.option("--eval-iters", type=int)
@click.option("--log-interval", type=int)
@click.option("--checkpoint-interval", type=int)
@click.option("--seed", type=int)
@click.option("--device", help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--compile/--no-compile", default=None, help="torch.compile the model.")
@click.option("--threads", type=int, help="torch intra-op threads (0: torch's default).")
@click.option("--micro-batch", type=int, help="Sequences per forward/backward (0: the memory plan's, probed on CUDA).")
@click.option("--activation-checkpointing", type=click.Choice(["auto", "on", "off"]))
@click.option("--optimizer-state", type=click.Choice(["auto", "fp32", "8bit", "offload"]))
@click.option("--progress/--no-progress", default=True, show_default=True, help="tqdm bar on a terminal.")
def train(out, config_file, resume, progress, **flags) -> None:
    """Train a GPT in one process (nanoGPT-style reference trainer)."""
    from geotrain.common.config import apply_overrides, load_run_config
    from geotrain.common.train import train as run_train

    try:
        run = load_run_config(config_file)
        apply_overrides(run, {_TRAIN_FLAGS[k]: v for k, v in flags.items()})
        run.validate()
        run_train(run, out, resume=resume, progress=progress)
    except ValueError as exc:
        fail(str(exc))


@cli.command()
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path),
              help="Trainer out dir, checkpoint root or one ckpt-* directory.")
@click.option("--prompt", default="\n", show_default=True, help="Start text ('' starts from end-of-text).")
@click.option("--max-new-tokens", default=200, show_default=True, type=click.IntRange(0))
@click.option("--temperature", default=0.8, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--top-k", default=200, show_default=True, type=click.IntRange(0), help="0: no top-k cut.")
@click.option("--num-samples", default=1, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=1337, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True)
def sample(checkpoint, prompt, max_new_tokens, temperature, top_k, num_samples, seed, device) -> None:
    """Generate text from a checkpoint."""
    from geotrain.common.sampling import sample_checkpoint

    try:
        texts = sample_checkpoint(checkpoint, prompt, max_new_tokens, temperature, top_k or None, seed,
                                  num_samples, device)
    except ValueError as exc:
        fail(str(exc))
    for i, text in enumerate(texts):
        if i:
            click.echo("---------------")
        click.echo(prompt + text)


@cli.command(name="eval")
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path),
              help="Trainer out dir, checkpoint root or one ckpt-* directory.")
@click.option("--data", type=click.Path(path_type=Path), help="Data directory (default: the checkpoint's).")
@click.option("--iters", default=200, show_default=True, type=click.IntRange(1), help="Validation batches.")
@click.option("--batch-size", default=12, show_default=True, type=click.IntRange(1))
@click.option("--seed", type=int, help="Batch seed (default: the trainer's fixed evaluation seed).")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def eval_(checkpoint, data, iters, batch_size, seed, device, as_json) -> None:
    """Validation loss and perplexity of a checkpoint."""
    import json as _json

    from geotrain.common.sampling import evaluate_checkpoint

    try:
        result = evaluate_checkpoint(checkpoint, data, iters, batch_size, seed, device)
    except ValueError as exc:
        fail(str(exc))
    if as_json:
        click.echo(_json.dumps(result, indent=2))
    else:
        click.echo(f"{result['checkpoint']} (step {result['step']}): val loss {result['val_loss']:.4f}, "
                   f"perplexity {result['perplexity']:.2f} over {result['tokens']:,} tokens")


@cli.command()
@click.argument("inputs", nargs=-1, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output data directory.")
@click.option("--tokenizer", type=click.Choice(["byte", "bpe"]), default="byte", show_default=True,
              help="byte: UTF-8 bytes + end-of-text (vocab 257). bpe: byte-level BPE trained here "
                   "(needs 'tokenizers'), saved as OUT/tokenizer.json.")
@click.option("--vocab-size", type=int, default=None,
              help="bpe: target vocabulary (>= 257, default 4096). byte: optional padded vocabulary "
                   "(>= 257). Above 65,536 ids tokens are stored as uint32.")
@click.option("--val-fraction", type=float, default=0.1, show_default=True,
              help="Validation share in [0, 0.5]: the last fraction of a single document, else whole documents.")
@click.option("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, show_default=True,
              help="Tokens per shard file (a worker downloads a whole shard before training from it).")
@click.option("--workers", type=int, default=None, help="Encoding processes (spawned). Default: 1 below 32 MiB of input, else CPU count (max 8).")
@click.option("--from-nanogpt", "from_nanogpt", type=click.Path(path_type=Path), default=None,
              help="Convert nanoGPT train.bin/val.bin (uint16) in this directory instead of encoding text; "
                   "vocab size from its meta.pkl, else --vocab-size.")
@click.option("--hf-dataset", default=None, metavar="NAME[:SPLIT]",
              help="Also encode the 'text' column of a Hugging Face dataset (needs 'datasets').")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar and summary.")
def prepare(inputs, out, tokenizer, vocab_size, val_fraction, shard_tokens, workers, from_nanogpt,
            hf_dataset, progress) -> None:
    """Tokenize INPUT files into token shards + manifest.json in --out.

    INPUT: text files, directories of them (recursive, sorted; hidden files skipped) or .jsonl files
    (one document per line, field "text"). With no INPUT: the embedded default corpus, the Python
    standard library's .py files (8 MiB). Documents are separated by the end-of-text token.

    Undecodable bytes are replaced with U+FFFD and a warning naming the file is printed (once per
    file); files that look binary are skipped with a warning.
    """
    from geotrain.common import data as data_mod

    try:
        if from_nanogpt is not None:
            if inputs or hf_dataset:
                fail("--from-nanogpt converts existing bins; give no INPUT or --hf-dataset with it")
            if not 0 < shard_tokens:
                fail(f"--shard-tokens must be positive, got {shard_tokens}")
            manifest = data_mod.import_nanogpt(from_nanogpt, out, vocab_size, shard_tokens=shard_tokens)
        else:
            manifest = data_mod.prepare(
                list(inputs), out, tokenizer=tokenizer, vocab_size=vocab_size, val_fraction=val_fraction,
                shard_tokens=shard_tokens, workers=workers, progress=progress, hf_dataset=hf_dataset,
            )
    except (ValueError, OSError) as exc:
        fail(str(exc))
        return
    n_train = sum(s.tokens for s in manifest.split("train"))
    n_val = sum(s.tokens for s in manifest.split("val"))
    click.echo(
        f"{out}: {n_train} train tokens, {n_val} val tokens, {len(manifest.shards)} shards, "
        f"tokenizer {manifest.tokenizer['name']}, vocab_size {manifest.vocab_size}, dtype {manifest.dtype}"
    )


@cli.command()
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1, 64), help="Worker processes.")
@click.option("--model", default="nano", show_default=True, help="Model preset.")
@click.option("--data", default="", help="Prepared data directory (default: the embedded corpus).")
@click.option("--config", type=click.Path(dir_okay=False, exists=True), help="Run config TOML.")
@click.option("--steps", default=500, show_default=True, type=click.IntRange(1),
              help="Inner steps per worker: sets the token budget (workers x steps x batch x block).")
@click.option("--tokens", default=0, type=click.IntRange(0), help="Token budget (overrides --steps).")
@click.option("--minutes", default=0.0, type=click.FloatRange(0), help="Stop after this many minutes (0 = no cap).")
@click.option("--compression", type=click.Choice(DELTA_SCHEMES))
@click.option("--round-steps", type=click.IntRange(1), help="Inner steps per local round.")
@click.option("--run-dir", default="runs/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--seed", default=1337, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--sync", is_flag=True, help="Train the workers as one sync group (--workers a power of two).")
def demo(workers, model, data, config, steps, tokens, minutes, compression, round_steps, run_dir, seed, as_json, sync):
    """Train on loopback: a coordinator and N worker processes, to a token budget."""
    import json as _json

    from geotrain.demo import DemoOptions, run_demo, sample_from_run

    opts = DemoOptions(
        workers=workers, model=model, data=data, config=config, steps=steps, tokens=tokens, minutes=minutes,
        compression=compression, round_steps=round_steps, run_dir=run_dir, seed=seed, sync=sync,
    )
    try:
        summary = run_demo(opts)
    except (ValueError, RuntimeError) as exc:
        fail(str(exc))
    if as_json:
        click.echo(_json.dumps(summary, indent=2))
        return
    click.echo(
        f"\nfinished: validation loss {summary['val_loss']:.4f}, {summary['tokens']:,} tokens, "
        f"version {summary['model_version']}, {summary['workers']} worker(s), {summary['seconds']:.0f} s, "
        f"up {summary['sent_bytes'] / 1e6:.2f} MB, down {summary['received_bytes'] / 1e6:.2f} MB, "
        f"waiting {100 * summary['wait_fraction']:.1f}%"
    )
    click.echo("sample:\n" + sample_from_run(Path(run_dir)))
    click.echo(f"summary: {Path(run_dir) / 'summary.json'}")


@cli.command()
@click.argument("target", metavar="HOST:PORT")
@click.option("--service", default="", help="Service name to check ('' = the whole server).")
@click.option("--timeout", default=5.0, show_default=True, type=click.FloatRange(0, min_open=True), help="Seconds.")
def health(target, service, timeout):
    """Check a coordinator's or worker's gRPC health endpoint; exit 0 when SERVING (for Docker)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from geotrain.protos.rpc import make_channel

    with make_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as exc:
            fail(f"{target}: {exc.code().name}: {exc.details()}")
    state = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    click.echo(f"{target}: {state}")
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        sys.exit(1)


@cli.command()
@click.argument("target", metavar="HOST:PORT")
@click.option("--json", "as_json", is_flag=True,
              help="Print the Status RPC's status_json (strict JSON: NaN, e.g. no validation loss yet, as null).")
@click.option("--token-file", type=click.Path(dir_okay=False), help="File with the run token (or GEOTRAIN_TOKEN).")
@click.option("--tls-ca", type=click.Path(dir_okay=False), help="PEM CA certificate: talk TLS to the coordinator.")
@click.option("--timeout", default=10.0, show_default=True, type=click.FloatRange(0, min_open=True), help="Seconds.")
def status(target, as_json, token_file, tls_ca, timeout):
    """Show a running coordinator's status: the run, then one row per live worker."""
    import json as _json
    import os

    import grpc

    from geotrain.protos.rpc import read_token
    from geotrain.common.status import render_status, strict_json
    from geotrain.protos.rpc import fetch_status

    try:
        token = read_token(token_file, os.environ.get("GEOTRAIN_TOKEN"))
        ca = Path(tls_ca).read_bytes() if tls_ca else None
    except (ValueError, OSError) as exc:
        fail(str(exc))
    try:
        snapshot = fetch_status(target, token=token, tls_ca=ca, timeout=timeout)
    except grpc.RpcError as exc:
        fail(f"{target}: {exc.code().name}: {exc.details()}")
    click.echo(_json.dumps(strict_json(snapshot), indent=2, allow_nan=False) if as_json else render_status(snapshot))


@cli.command()
@click.option("--model", "preset", default="gpt2", show_default=True,
              help="Model preset: nano, gpt2, gpt2-medium, gpt2-large, gpt2-xl.")
@click.option("--gpu-memory", required=True, help="Memory of one GPU: 24GiB, 24GB, 16000MiB ...")
@click.option("--nproc-per-node", default=1, show_default=True, type=click.IntRange(1),
              help="Processes (one GPU each) per node; scales the host memory of an offloaded optimizer.")
@click.option("--batch-size", default=12, show_default=True, type=click.IntRange(1), help="Sequences per inner step per GPU.")
@click.option("--block-size", type=click.IntRange(1), help="Sequence length (default: the preset's).")
@click.option("--vocab-size", default=50257, show_default=True, type=click.IntRange(1))
@click.option("--micro-batch", default=0, show_default=True, type=click.IntRange(0), help="0: the largest that fits.")
@click.option("--activation-checkpointing", default="auto", show_default=True, type=click.Choice(["auto", "on", "off"]))
@click.option("--optimizer-state", default="auto", show_default=True, type=click.Choice(["auto", "fp32", "8bit", "offload"]),
              help="auto: fp32, else 8bit with --8bit-available, else offload.")
@click.option("--8bit-available/--no-8bit-available", "have_8bit", default=False, show_default=True,
              help="Let auto choose 8-bit AdamW (bitsandbytes installed on the GPU host).")
def plan(preset, gpu_memory, nproc_per_node, batch_size, block_size, vocab_size, micro_batch,
         activation_checkpointing, optimizer_state, have_8bit):
    """Print the memory plan of one GPU: weights, gradients, optimizer state, activations, and the
    micro-batch, activation checkpointing and optimizer state that fit. Exits 1 when nothing fits."""
    from geotrain.common.config import model_config
    from geotrain.common.memplan import make_plan, parse_size

    try:
        cfg = model_config(preset, vocab_size=vocab_size, block_size=block_size)
        result = make_plan(cfg, parse_size(gpu_memory), batch_size, nproc=nproc_per_node, micro_batch=micro_batch,
                           checkpointing=activation_checkpointing, optimizer_state=optimizer_state, have_8bit=have_8bit)
    except ValueError as exc:
        fail(str(exc))
    click.echo(result.table(f"memory plan: {preset}, {gpu_memory} per GPU"))
    if not result.fits:
        click.echo(f"error: {preset} does not fit in {gpu_memory}: {result.reason}", err=True)
        sys.exit(1)


@cli.command()
@click.argument("run_dir", metavar="RUN_DIR", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Output directory (default: RUN_DIR/plots).")
def plot(run_dir, out):
    """Write PNG charts from RUN_DIR/history.jsonl (loss vs tokens and time, per-worker throughput
    and traffic). Needs matplotlib: pip install 'geotrain[plot]'."""
    from geotrain.common.plot import PlotError, plot_run

    try:
        paths = plot_run(run_dir, out)
    except PlotError as exc:
        fail(str(exc))
    for path in paths:
        click.echo(str(path))


def main() -> None:
    """The `geotrain` command: exits without the interpreter's teardown (common/entry.py)."""
    from geotrain.common.entry import run_then_exit

    run_then_exit(cli)
