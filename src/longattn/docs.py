"""Documentation generated from the registry: ``docs/methods.md`` (``longattn list --markdown``).

The method catalogue is written from what the classes declare (name, slot, paper, summary, settings with their
defaults, old spellings, kvpress equivalent), so it cannot drift from the code; a test checks the committed
file equals ``methods_markdown()``. Regenerate with ``longattn list --markdown > docs/methods.md``.
"""

from __future__ import annotations

import dataclasses
import re

__all__ = ["methods_markdown"]

_URL = re.compile(r"(https?://\S+)")
_TITLES = {"prefill": "Prefill patterns (`prefill` slot)", "kv": "KV-cache policies (`kv` slot)",
           "decode": "Decode-time selectors (`decode` slot)",
           "calibrate": "Attention calibration (`calibrate` slot)", "task": "Bench tasks (`--task`)",
           "mixer": "Trainable token mixers (`longattn train --mixer`)"}


def _paper(text: str) -> str:
    """``"Title (venue) https://..."`` -> ``"[Title (venue)](https://...)"``; several papers split by ``;``."""
    out = []
    for part in (p.strip() for p in text.split(";")):
        m = _URL.search(part)
        if m:
            title = part[: m.start()].strip() or m.group(1)
            out.append(f"[{title}]({m.group(1)})")
        elif part:
            out.append(part)
    return "; ".join(out) or "-"


def _settings(cls) -> str:
    if not dataclasses.is_dataclass(cls):  # a mixer: its constructor's own settings
        from .train import mixer_settings

        return ", ".join(f"`{n}={d}`" for n, (_, d) in mixer_settings(cls).items()) or "-"
    fields = [f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")]
    parts = []
    for f in fields:
        default = f.default if f.default is not dataclasses.MISSING else "required"
        parts.append(f"`{f.name}={default}`")
    return ", ".join(parts) or "-"


def methods_markdown() -> str:
    """The method catalogue as Markdown, one table per kind, from the registry."""
    from . import registry

    lines = ["# Methods", "",
             "Generated from the registry by `longattn list --markdown` (a test checks it is current). A recipe",
             "joins one method per slot with `+`; a method is `name[:key=value...]`. Settings are listed with their",
             "defaults; the old spellings in the last column still work with a deprecation warning.", ""]
    for kind in ("prefill", "kv", "decode", "calibrate", "task", "mixer"):
        lines += [f"## {_TITLES[kind]}", ""]
        if kind == "kv":
            lines += ["| name | paper | what it does | settings | kvpress | old names |", "|---|---|---|---|---|---|"]
        else:
            lines += ["| name | paper | what it does | settings | old names |", "|---|---|---|---|---|"]
        for e in registry.entries(kind):
            renamed = getattr(e.cls, "renamed", None) or {}
            old = ", ".join(f"`{a}` -> `{b}`" for a, b in renamed.items()) or "-"
            row = [f"`{e.name}`", _paper(e.paper), e.summary.replace("|", "\\|"), _settings(e.cls)]
            if kind == "kv":
                row.append(f"`{e.cls.__dict__['kvpress_press']}`" if e.cls.__dict__.get("kvpress_press") else "-")
            row.append(old)
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)
