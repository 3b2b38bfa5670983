"""GPT-2 weights in Hugging Face format: import (`--init-from`) and export (`geotrain export`).

A Hugging Face GPT-2 directory holds `config.json` (model_type "gpt2") and `model.safetensors`
(or a sharded `model.safetensors.index.json`, or a legacy `pytorch_model.bin`). Its tensor names
are geotrain's (common/model.py mirrors GPT-2), with three differences handled here:

* `attn.c_attn`, `attn.c_proj`, `mlp.c_fc`, `mlp.c_proj` are `Conv1D` layers storing their weight
  [in, out]; geotrain's `nn.Linear` stores [out, in]: those four weights are transposed.
* the lm_head is tied to `transformer.wte` and not stored; older files name tensors without the
  `transformer.` prefix and carry the attention mask buffers `attn.bias` / `attn.masked_bias`.
* geotrain computes the exact GELU (`activation_function = "gelu"`); OpenAI's GPT-2 uses the tanh
  approximation `gelu_new`. Such weights are imported as they are and run with the exact GELU,
  as nanoGPT does (the two differ by less than 1e-3 at any input), and every export says "gelu",
  so an exported model computes in transformers exactly what it computed in geotrain.

geotrain models without biases (`bias = False`, the nano preset) export with zero biases, which
leaves every output bit-identical. LayerNorm epsilon is 1e-5 on both sides.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Mapping

import safetensors.torch
import torch

from geotrain.common.config import ModelConfig

log = logging.getLogger("geotrain.hf")

# geotrain's GPT-2 presets and where their OpenAI weights live on the Hugging Face hub.
HUB_MODELS = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
HUB_TOKENIZER_REPO = "openai-community/gpt2"  # the same BPE for every GPT-2 size
HUB_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json")
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of older files
GPT2_VOCAB = 50257  # the gpt2 tokenizer's ids; end-of-text is 50256
LAYER_NORM_EPS = 1e-5  # common/model.py LayerNorm
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh")  # accepted on import; "gelu" is exact


# --------------------------------------------------------------------------- config


def model_config_from_hf(
    hf: Mapping[str, Any], where: str = "config.json", block_size: int | None = None, dropout: float = 0.0
) -> ModelConfig:
    """geotrain's ModelConfig for a Hugging Face GPT-2 config dict (bias on, as GPT-2).

    block_size (<= n_positions) crops the position table; None keeps n_positions. ValueError,
    naming `where` and the field, for any config that geotrain's GPT cannot reproduce.
    """
    if not isinstance(hf, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(hf).__name__}")
    if hf.get("model_type") != "gpt2":
        raise ValueError(f"{where}: model_type is {hf.get('model_type')!r}, not 'gpt2': only GPT-2 shaped models import")
    shape = {}
    for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
        value = hf.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{where}: {key} must be a positive integer, got {value!r}")
        shape[key] = value
    checks = [
        ("n_inner", hf.get("n_inner") in (None, 4 * shape["n_embd"]), f"None or {4 * shape['n_embd']}"),
        ("activation_function", hf.get("activation_function", "gelu_new") in ACTIVATIONS, " or ".join(ACTIVATIONS)),
        ("layer_norm_epsilon", hf.get("layer_norm_epsilon", LAYER_NORM_EPS) == LAYER_NORM_EPS, str(LAYER_NORM_EPS)),
        ("scale_attn_weights", hf.get("scale_attn_weights", True) is True, "true"),
        ("scale_attn_by_inverse_layer_idx", not hf.get("scale_attn_by_inverse_layer_idx", False), "false"),
        ("add_cross_attention", not hf.get("add_cross_attention", False), "false"),
        ("tie_word_embeddings", hf.get("tie_word_embeddings", True) is True, "true"),
    ]
    for key, ok, want in checks:
        if not ok:
            raise ValueError(f"{where}: {key} is {hf.get(key)!r}; geotrain's GPT-2 needs {want}")
    if block_size is None:
        block_size = shape["n_positions"]
    if not 0 < block_size <= shape["n_positions"]:
        raise ValueError(f"block_size {block_size} must be in [1, n_positions = {shape['n_positions']}] of {where}")
    return ModelConfig(
        n_layer=shape["n_layer"], n_head=shape["n_head"], n_embd=shape["n_embd"], block_size=block_size,
        vocab_size=shape["vocab_size"], dropout=dropout, bias=True,
    ).validate()


def hf_config(cfg: ModelConfig, vocab_size: int | None = None, eot_id: int | None = None) -> dict[str, Any]:
    """config.json of the GPT2LMHeadModel that computes what geotrain's GPT(cfg) computes."""
    vocab = cfg.vocab_size if vocab_size is None else vocab_size
    out: dict[str, Any] = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": vocab,
        "n_positions": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "activation_function": "gelu",
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    if eot_id is not None and 0 <= eot_id < vocab:
        out.update(bos_token_id=eot_id, eos_token_id=eot_id)
    else:  # transformers warns about ids outside the vocabulary (its default is gpt2's 50256)
        out.update(bos_token_id=None, eos_token_id=None)
    return out


# --------------------------------------------------------------------------- tensors


def gpt_state_from_hf(tensors: Mapping[str, torch.Tensor], cfg: ModelConfig, where: str = "") -> dict[str, torch.Tensor]:
    """A geotrain GPT state_dict (fp32, lm_head tied to wte) from Hugging Face GPT-2 tensors.

    Accepts names with or without the `transformer.` prefix, drops mask buffers, refuses an untied
    lm_head, missing or unexpected tensors and wrong shapes (ValueError naming them)."""
    out: dict[str, torch.Tensor] = {}
    lm_head = None
    for name, t in tensors.items():
        if name == "lm_head.weight":
            lm_head = t
            continue
        if name.endswith(_BUFFER_SUFFIXES):
            continue
        key = name if name.startswith("transformer.") else f"transformer.{name}"
        t = t.detach().to(torch.float32)
        if key.endswith(CONV1D_SUFFIXES):
            t = t.t()  # Conv1D [in, out] -> nn.Linear [out, in]
        out[key] = t.contiguous()
    expected = _expected_shapes(cfg)
    missing = sorted(set(expected) - set(out))
    extra = sorted(set(out) - set(expected))
    if missing or extra:
        raise ValueError(f"{where}: tensors do not match a GPT-2 of this config: missing {missing[:5]}, unexpected {extra[:5]}")
    wpe = out["transformer.wpe.weight"]
    if wpe.shape[0] > cfg.block_size:
        out["transformer.wpe.weight"] = wpe[: cfg.block_size].contiguous()  # cropped to block_size
    for key, shape in expected.items():
        if tuple(out[key].shape) != shape:
            raise ValueError(f"{where}: tensor {key} has shape {tuple(out[key].shape)}, expected {shape}")
    if lm_head is not None and not torch.equal(lm_head.to(torch.float32), out["transformer.wte.weight"]):
        raise ValueError(f"{where}: lm_head.weight differs from transformer.wte.weight; geotrain ties them")
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def hf_tensors_from_gpt(state: Mapping[str, torch.Tensor], cfg: ModelConfig, vocab_size: int | None = None) -> dict[str, torch.Tensor]:
    """Hugging Face GPT-2 tensors (`transformer.*`, Conv1D weights [in, out], no lm_head) from a
    geotrain GPT state_dict. vocab_size < cfg.vocab_size keeps the first rows of wte (padding rows
    dropped); a model without biases gets zero biases."""
    vocab = cfg.vocab_size if vocab_size is None else vocab_size
    if not 0 < vocab <= cfg.vocab_size:
        raise ValueError(f"vocab_size {vocab} must be in [1, {cfg.vocab_size}]")
    out: dict[str, torch.Tensor] = {}
    for key, shape in _expected_shapes(cfg).items():
        t = state.get(key)
        if t is None:
            if key.endswith(".bias") and not cfg.bias:
                t = torch.zeros(shape)
            else:
                raise ValueError(f"the model state has no tensor {key}")
        t = t.detach().to("cpu", torch.float32)
        if key == "transformer.wte.weight":
            t = t[:vocab]
        if key.endswith(CONV1D_SUFFIXES):
            t = t.t()
        out[key] = t.contiguous().clone()
    return out


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face names (with `transformer.`) -> geotrain-orientation shapes, biases included."""
    C, V, T = cfg.n_embd, cfg.vocab_size, cfg.block_size
    shapes = {"transformer.wte.weight": (V, C), "transformer.wpe.weight": (T, C),
              "transformer.ln_f.weight": (C,), "transformer.ln_f.bias": (C,)}
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        for name, shape in (("ln_1", (C,)), ("ln_2", (C,))):
            shapes[f"{p}{name}.weight"] = shape
            shapes[f"{p}{name}.bias"] = shape
        for name, (out_f, in_f) in (("attn.c_attn", (3 * C, C)), ("attn.c_proj", (C, C)),
                                     ("mlp.c_fc", (4 * C, C)), ("mlp.c_proj", (C, 4 * C))):
            shapes[f"{p}{name}.weight"] = (out_f, in_f)
            shapes[f"{p}{name}.bias"] = (out_f,)
    return shapes


# --------------------------------------------------------------------------- import


def resolve_source(source: str) -> Path:
    """A local Hugging Face directory as is; a hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl, or
    an owner/name repo) downloaded through huggingface_hub when it is installed and online.

    huggingface_hub puts a deadline on every request (HF_HUB_DOWNLOAD_TIMEOUT, HF_HUB_ETAG_TIMEOUT,
    10 s by default) and caches what it downloads (HF_HOME)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if source not in HUB_MODELS and (source.count("/") != 1 or path.exists() or source.startswith((".", "/", "~"))):
        raise ValueError(f"--init-from {source!r} is neither a directory nor one of {sorted(HUB_MODELS)}")
    repo = HUB_MODELS.get(source, source)
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ValueError(
            f"--init-from {source}: downloading needs huggingface_hub (pip install huggingface_hub), "
            "or pass a local directory with config.json and model.safetensors"
        ) from None
    try:
        return Path(snapshot_download(repo, allow_patterns=["config.json", "model.safetensors", *HUB_TOKENIZER_FILES]))
    except Exception as exc:  # network, authentication, missing repo: huggingface_hub's own types
        raise ValueError(f"--init-from {source}: cannot download {repo} from the Hugging Face hub: {exc}") from exc


def read_hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face model directory (single or sharded safetensors, or
    pytorch_model.bin loaded weights_only)."""
    directory = Path(directory)
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    legacy = directory / "pytorch_model.bin"
    try:
        if single.is_file():
            return safetensors.torch.load_file(str(single))
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            out: dict[str, torch.Tensor] = {}
            for name in files:
                out.update(safetensors.torch.load_file(str(directory / name)))
            return out
        if legacy.is_file():
            return dict(torch.load(legacy, map_location="cpu", weights_only=True))
    except Exception as exc:  # safetensors / json / torch raise their own types on damaged files
        raise ValueError(f"{directory}: cannot read the model weights: {exc}") from exc
    raise ValueError(f"{directory} holds no model.safetensors (nor model.safetensors.index.json, pytorch_model.bin)")


def load_hf_gpt2(
    source: str | Path, block_size: int | None = None, dropout: float = 0.0
) -> tuple[ModelConfig, dict[str, torch.Tensor], Path]:
    """(ModelConfig, geotrain GPT state_dict, resolved directory) of a Hugging Face GPT-2."""
    directory = resolve_source(str(source))
    config_path = directory / "config.json"
    try:
        hf = json.loads(config_path.read_text())
    except OSError as exc:
        raise ValueError(f"{directory} has no readable config.json: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_path} is not valid JSON: {exc}") from exc
    cfg = model_config_from_hf(hf, str(config_path), block_size=block_size, dropout=dropout)
    if hf.get("activation_function", "gelu_new") != "gelu":
        log.warning("%s uses %s; geotrain computes the exact GELU instead (as nanoGPT does)",
                    config_path, hf.get("activation_function", "gelu_new"))
    state = gpt_state_from_hf(read_hf_tensors(directory), cfg, str(directory))
    return cfg, state, directory


def initial_model(section: Any, vocab_size: int, tokenizer_name: str = "") -> tuple[ModelConfig, dict[str, torch.Tensor] | None]:
    """The model a run starts from: (config, None) for a fresh model of the preset, or the config
    and weights of `section.init_from` (a ModelSection). Used by the reference trainer and the
    coordinator when they build their first model.

    With init_from, the shape comes from the Hugging Face config: preset and the shape fields are
    ignored unless set, when they must agree; block_size may crop, dropout applies. The data's
    vocabulary must be the model's (or smaller, for the gpt2 tokenizer against a padded table)."""
    if not section.init_from:
        return section.build(vocab_size=vocab_size), None
    cfg, state, directory = load_hf_gpt2(section.init_from, section.block_size, section.dropout or 0.0)
    for name in ("n_layer", "n_head", "n_embd", "bias"):
        want = getattr(section, name)
        if want is not None and want != getattr(cfg, name):
            raise ValueError(f"model.{name} = {want!r} but the model of --init-from {section.init_from} has {getattr(cfg, name)!r}")
    fits = vocab_size == cfg.vocab_size or (tokenizer_name == "gpt2" and vocab_size <= cfg.vocab_size)
    if not fits:
        raise ValueError(
            f"the data's vocabulary ({vocab_size} tokens, tokenizer {tokenizer_name or 'unknown'}) does not match "
            f"the {cfg.vocab_size}-token model of --init-from {section.init_from}; prepare the data with the "
            "model's tokenizer (--tokenizer gpt2 for GPT-2)"
        )
    log.info("initial weights from %s: %s", directory, cfg)
    return cfg, state


# --------------------------------------------------------------------------- export


def save_hf_gpt2(
    out_dir: Path, cfg: ModelConfig, state: Mapping[str, torch.Tensor], vocab_size: int | None = None,
    eot_id: int | None = None,
) -> Path:
    """Write config.json + model.safetensors of a GPT2LMHeadModel into out_dir (created)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = hf_tensors_from_gpt(state, cfg, vocab_size)
    safetensors.torch.save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = hf_config(cfg, vocab_size, eot_id)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def export_checkpoint(checkpoint: Path | str, out_dir: Path | str, tokenizer: str | None = None) -> dict[str, Any]:
    """`geotrain export`: any geotrain checkpoint (trainer or coordinator) -> a Hugging Face
    GPT2LMHeadModel directory, with tokenizer files where the tokenizer allows (README).

    tokenizer: None uses the checkpoint's; "gpt2" or "byte" names it, for checkpoints trained on
    imported token ids. Returns what was written (the CLI prints it)."""
    from geotrain.common.sampling import load_checkpoint_model

    model, cfg, state, ckpt = load_checkpoint_model(checkpoint)
    model_state = model.state_dict()
    spec = state.get("tokenizer") if isinstance(state.get("tokenizer"), dict) else None
    recorded = spec.get("name") if spec else None
    name = tokenizer or recorded
    if tokenizer and recorded not in (None, "external", tokenizer):
        raise ValueError(f"checkpoint {ckpt} was trained with the {recorded} tokenizer, not {tokenizer}")
    tok_vocab = {"gpt2": GPT2_VOCAB, "byte": 257}.get(name or "", spec.get("vocab_size") if spec else None)
    tok_vocab = tok_vocab or cfg.vocab_size
    if tok_vocab > cfg.vocab_size:
        raise ValueError(
            f"checkpoint {ckpt} has a {cfg.vocab_size}-token vocabulary but the {name} tokenizer has {tok_vocab} tokens"
        )
    eot = {"gpt2": GPT2_VOCAB - 1, "byte": 256}.get(name or "", spec.get("eot_id", -1) if spec else -1)
    out_dir = Path(out_dir)
    save_hf_gpt2(out_dir, cfg, model_state, tok_vocab, eot)
    files = ["config.json", "model.safetensors"]
    note = write_tokenizer_files(out_dir, name, spec, state.get("data_dir"))
    files += note[0]
    return {"checkpoint": str(ckpt), "step": state.get("step", state.get("version")), "out": str(out_dir),
            "vocab_size": tok_vocab, "tokenizer": name, "files": files, "note": note[1]}


def write_tokenizer_files(out_dir: Path, name: str | None, spec: dict | None, data_dir: str | None) -> tuple[list[str], str]:
    """Tokenizer files next to an exported model: (files written, a note for the user or '').

    gpt2: the hub's GPT-2 tokenizer files (huggingface_hub, when online). byte: a tokenizers BPE
    with no merges whose ids are the UTF-8 byte values, end-of-text 256 (README). bpe: the run's
    own tokenizer.json. Others: none."""
    out_dir = Path(out_dir)
    if name == "byte":
        _write_byte_tokenizer(out_dir)
        return ["tokenizer.json", "tokenizer_config.json"], ""
    if name == "bpe" and spec and data_dir:
        src = Path(data_dir) / spec.get("file", "tokenizer.json")
        if src.is_file():
            shutil.copyfile(src, out_dir / "tokenizer.json")
            _write_tokenizer_config(out_dir, eot="<|endoftext|>")
            return ["tokenizer.json", "tokenizer_config.json"], ""
        return [], f"the run's tokenizer {src} is gone: no tokenizer files written"
    if name == "gpt2":
        try:
            from huggingface_hub import hf_hub_download

            for fname in HUB_TOKENIZER_FILES:
                shutil.copyfile(hf_hub_download(HUB_TOKENIZER_REPO, fname), out_dir / fname)
            return list(HUB_TOKENIZER_FILES), ""
        except Exception as exc:  # ImportError or any download failure: the model is still complete
            return [], (f"GPT-2 tokenizer files not written ({type(exc).__name__}); "
                        f"load them with AutoTokenizer.from_pretrained({HUB_TOKENIZER_REPO!r})")
    return [], f"no tokenizer files for the {name or 'unrecorded'} tokenizer"


def _write_tokenizer_config(out_dir: Path, eot: str) -> None:
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": eot, "eos_token": eot,
              "unk_token": None, "model_max_length": 1 << 30, "clean_up_tokenization_spaces": False}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def byte_tokenizer_json() -> str:
    """A Hugging Face `tokenizers` JSON for geotrain's byte tokenizer: ByteLevel pre-tokenizer
    (each byte -> one printable symbol), BPE with no merges and vocabulary {symbol of byte b: b},
    plus the special <|endoftext|> = 256. Encoding "é" gives [195, 169], as geotrain does."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    except ImportError:
        raise ValueError("exporting the byte tokenizer needs Hugging Face 'tokenizers' (pip install tokenizers)") from None
    symbols = pre_tokenizers.ByteLevel.alphabet()  # the 256 symbols, in no particular order
    to_symbol = _bytes_to_unicode()
    assert set(symbols) == set(to_symbol.values())
    vocab = {to_symbol[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    if tok.token_to_id("<|endoftext|>") != 256:
        raise ValueError("the byte tokenizer's end-of-text id is not 256")
    return tok.to_str()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the one ByteLevel uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _write_byte_tokenizer(out_dir: Path) -> None:
    (out_dir / "tokenizer.json").write_text(byte_tokenizer_json())
    _write_tokenizer_config(out_dir, eot="<|endoftext|>")
