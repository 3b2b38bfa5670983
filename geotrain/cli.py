"""`geotrain`: the umbrella command (prepare, train, sample, eval, export, demo, status, health, plot, plan).

Each subcommand's options are derived from the typed dataclasses of common/config.py
(common/options.py); flags, GEOTRAIN_* variables and `--config FILE.toml` where it applies fill one
of them and a plain function runs; ValueError from those becomes a clear message and exit status 2.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import click

from geotrain.common import __version__
from geotrain.common.config import DemoConfig, EvalCheckpointConfig, RunConfig, SampleConfig, StatusConfig
from geotrain.common.shards import DEFAULT_SHARD_TOKENS
from geotrain.common.options import config_from_params, config_options
from geotrain.common.config import RECIPES


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="geotrain")
def cli() -> None:
    """Train GPT models on GPUs scattered over the internet."""


def fail(message: str) -> None:
    """Print a one-line error and exit 2 (callers' mistakes: bad flags, bad files)."""
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


# --------------------------------------------------------------------------- train / sample / eval

# RunConfig fields with a flag on `geotrain train` (the file given with --config sets any field)
TRAIN_OPTIONS = (
    "data.dir", "model.preset", "model.n_layer", "model.n_head", "model.n_embd", "model.block_size",
    "model.dropout", "model.bias", "train.batch_size", "train.grad_accum", "train.max_iters", "optim.lr",
    "optim.min_lr", "optim.warmup_iters", "optim.lr_decay_iters", "optim.weight_decay", "optim.beta1",
    "optim.beta2", "optim.grad_clip", "train.eval_interval", "train.eval_iters", "train.log_interval",
    "train.checkpoint_interval", "train.seed", "train.device", "train.compile", "train.threads",
    "model.init_from", "train.micro_batch", "train.activation_checkpointing", "train.optimizer_state",
)


def _fields(cls) -> tuple[str, ...]:
    """The names of the fields of `cls` that are command-line options."""
    return tuple(f.name for f in dataclasses.fields(cls) if "cli" in f.metadata)


@cli.command()
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output directory: checkpoints/, config.json, history.jsonl, summary.json.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), envvar="GEOTRAIN_CONFIG",
              show_envvar=True, help="Run config TOML; flags and GEOTRAIN_* variables override it.")
@click.option("--resume", is_flag=True, help="Continue from the latest valid checkpoint in --out.")
@config_options(RunConfig, TRAIN_OPTIONS)
@click.option("--recipe", type=click.Choice(sorted(RECIPES)),
              help="Defaults for a purpose (below --config and flags). finetune: nanoGPT's finetune_shakespeare "
                   "(constant lr 3e-5, 20 iters of 32 sequences), for --init-from.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="tqdm bar on a terminal.")
def train(out, config_file, resume, recipe, progress, **params) -> None:
    """Train a GPT in one process (nanoGPT-style reference trainer)."""
    from geotrain.common.config import load_run_config
    from geotrain.common.train import train as run_train

    try:
        run = config_from_params(RunConfig, params, base=load_run_config(config_file, recipe))
        run.validate()
        run_train(run, out, resume=resume, progress=progress)
    except ValueError as exc:
        fail(str(exc))


@cli.command()
@config_options(SampleConfig, _fields(SampleConfig))
def sample(**params) -> None:
    """Generate text from a checkpoint."""
    from geotrain.common.sampling import sample_checkpoint

    try:
        c: SampleConfig = config_from_params(SampleConfig, params)
        texts = sample_checkpoint(Path(c.checkpoint), c.prompt, c.max_new_tokens, c.temperature, c.top_k or None,
                                  c.seed, c.num_samples, c.device)
    except ValueError as exc:
        fail(str(exc))
    for i, text in enumerate(texts):
        if i:
            click.echo("---------------")
        click.echo(c.prompt + text)


@cli.command(name="eval")
@config_options(EvalCheckpointConfig, _fields(EvalCheckpointConfig))
@click.option("--hellaswag", "hellaswag", is_flag=False, flag_value="-", default=None, metavar="[FILE]",
              help="Score HellaSwag instead (acc, acc_norm): FILE is jsonl in the dataset's format; alone, the "
                   "public validation split is downloaded once. --batch-size counts examples, --iters is ignored.")
@click.option("--limit", type=click.IntRange(1), help="HellaSwag: only the first N examples.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="HellaSwag: tqdm bar on a terminal.")
def eval_(hellaswag, limit, progress, **params) -> None:
    """Validation loss and perplexity of a checkpoint, or its HellaSwag accuracy."""
    import json as _json

    from geotrain.common.sampling import evaluate_checkpoint

    try:
        c: EvalCheckpointConfig = config_from_params(EvalCheckpointConfig, params)
    except ValueError as exc:
        fail(str(exc))
    if hellaswag is not None:
        from geotrain.common.hellaswag import evaluate_checkpoint_hellaswag

        try:
            result = evaluate_checkpoint_hellaswag(Path(c.checkpoint), None if hellaswag == "-" else hellaswag, limit,
                                                   c.batch_size, c.device, progress and not c.json)
        except ValueError as exc:
            fail(str(exc))
        if c.json:
            click.echo(_json.dumps(result, indent=2))
        else:
            click.echo(f"{result['checkpoint']} (step {result['step']}): HellaSwag acc {result['acc']:.4f}, "
                       f"acc_norm {result['acc_norm']:.4f} over {result['examples']} examples")
        return
    try:
        result = evaluate_checkpoint(Path(c.checkpoint), Path(c.data) if c.data else None, c.iters, c.batch_size,
                                     c.seed, c.device)
    except ValueError as exc:
        fail(str(exc))
    if c.json:
        click.echo(_json.dumps(result, indent=2))
    else:
        click.echo(f"{result['checkpoint']} (step {result['step']}): val loss {result['val_loss']:.4f}, "
                   f"perplexity {result['perplexity']:.2f} over {result['tokens']:,} tokens")


@cli.command()
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path),
              help="Trainer out dir, coordinator run dir or checkpoint root, or one ckpt-* directory.")
@click.option("--hf", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output directory of the Hugging Face GPT2LMHeadModel.")
@click.option("--tokenizer", type=click.Choice(["gpt2", "byte"]),
              help="The tokenizer of a checkpoint trained on imported token ids (default: the checkpoint's).")
def export(checkpoint, out, tokenizer) -> None:
    """Write a checkpoint as a Hugging Face GPT2LMHeadModel (config.json, model.safetensors and
    tokenizer files where the tokenizer allows: see README)."""
    from geotrain.common.hf import export_checkpoint

    try:
        result = export_checkpoint(checkpoint, out, tokenizer)
    except (ValueError, OSError) as exc:
        fail(str(exc))
    click.echo(f"{result['out']}: {', '.join(result['files'])} from {result['checkpoint']} "
               f"(vocab {result['vocab_size']}, tokenizer {result['tokenizer']})")
    if result["note"]:
        click.echo(f"note: {result['note']}")


@cli.command()
@click.argument("inputs", nargs=-1, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output data directory.")
@click.option("--tokenizer", type=click.Choice(["byte", "bpe", "gpt2"]), default=None,
              help="byte (default): UTF-8 bytes + end-of-text (vocab 257). bpe: byte-level BPE trained here "
                   "(needs 'tokenizers'), saved as OUT/tokenizer.json. gpt2: GPT-2's BPE through tiktoken "
                   "(vocab 50,257), saved as OUT/gpt2.tiktoken; with --from-nanogpt it records the bins' tokenizer.")
@click.option("--tokenizer-file", type=click.Path(path_type=Path), default=None,
              help="gpt2: GPT-2's vocab.bpe (encoder.json beside it), a .tiktoken rank file, or a directory "
                   "holding them. Default: tiktoken's cache (TIKTOKEN_CACHE_DIR); nothing is downloaded.")
@click.option("--vocab-size", type=int, default=None,
              help="bpe: target vocabulary (>= 257, default 4096). byte: optional padded vocabulary "
                   "(>= 257). gpt2: fixed (50,257). Above 65,536 ids tokens are stored as uint32.")
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
def prepare(inputs, out, tokenizer, tokenizer_file, vocab_size, val_fraction, shard_tokens, workers, from_nanogpt,
            hf_dataset, progress) -> None:
    """Tokenize INPUT files into token shards + manifest.json in --out.

    INPUT: text files, directories of them (recursive, sorted; hidden files skipped) or .jsonl files
    (one document per line, field "text"). With no INPUT: the embedded default corpus, the Python
    standard library's .py files (8 MiB). Documents are separated by the end-of-text token.

    Undecodable bytes are replaced with U+FFFD and a warning naming the file is printed (once per
    file); files that look binary are skipped with a warning.
    """
    from geotrain.common.nanogpt import import_nanogpt
    from geotrain.common.prepare import prepare as run_prepare
    from geotrain.common.tokenizer import load_gpt2_tokenizer

    if tokenizer_file is not None and tokenizer != "gpt2":
        fail("--tokenizer-file applies to --tokenizer gpt2 only")
    try:
        if from_nanogpt is not None:
            if inputs or hf_dataset:
                fail("--from-nanogpt converts existing bins; give no INPUT or --hf-dataset with it")
            if tokenizer not in (None, "gpt2"):
                fail(f"--from-nanogpt keeps the bins' token ids: --tokenizer {tokenizer} cannot apply (gpt2 can)")
            if not 0 < shard_tokens:
                fail(f"--shard-tokens must be positive, got {shard_tokens}")
            tok = load_gpt2_tokenizer(tokenizer_file) if tokenizer == "gpt2" else None
            manifest = import_nanogpt(from_nanogpt, out, vocab_size, shard_tokens=shard_tokens, tokenizer=tok)
        else:
            manifest = run_prepare(
                list(inputs), out, tokenizer=tokenizer or "byte", vocab_size=vocab_size, val_fraction=val_fraction,
                shard_tokens=shard_tokens, workers=workers, progress=progress, hf_dataset=hf_dataset,
                tokenizer_file=tokenizer_file,
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
@config_options(DemoConfig, _fields(DemoConfig))
def demo(**params):
    """Train on loopback: a coordinator and N worker processes, to a token budget."""
    import json as _json

    from geotrain.demo import run_demo, sample_from_run

    try:
        opts: DemoConfig = config_from_params(DemoConfig, params)
        summary = run_demo(opts)
    except (ValueError, RuntimeError) as exc:
        fail(str(exc))
    if opts.json:
        click.echo(_json.dumps(summary, indent=2))
        return
    click.echo(
        f"\nfinished: validation loss {summary['val_loss']:.4f}, {summary['tokens']:,} tokens, "
        f"version {summary['model_version']}, {summary['workers']} worker(s), {summary['seconds']:.0f} s, "
        f"up {summary['sent_bytes'] / 1e6:.2f} MB, down {summary['received_bytes'] / 1e6:.2f} MB, "
        f"waiting {100 * summary['wait_fraction']:.1f}%"
    )
    click.echo("sample:\n" + sample_from_run(Path(opts.run_dir)))
    click.echo(f"summary: {Path(opts.run_dir) / 'summary.json'}")


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
@config_options(StatusConfig, _fields(StatusConfig))
def status(target, **params):
    """Show a running coordinator's status: the run, then one row per live worker."""
    import json as _json

    import grpc

    from geotrain.protos.rpc import read_token
    from geotrain.common.status import render_status, strict_json
    from geotrain.protos.rpc import fetch_status

    try:
        c: StatusConfig = config_from_params(StatusConfig, params)
        token = read_token(c.token_file, c.token)
        ca = Path(c.tls_ca).read_bytes() if c.tls_ca else None
    except (ValueError, OSError) as exc:
        fail(str(exc))
    try:
        snapshot = fetch_status(target, token=token, tls_ca=ca, timeout=c.timeout)
    except grpc.RpcError as exc:
        fail(f"{target}: {exc.code().name}: {exc.details()}")
    click.echo(_json.dumps(strict_json(snapshot), indent=2, allow_nan=False) if c.json else render_status(snapshot))


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
