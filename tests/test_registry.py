"""The registry is the single source of truth: every method file is discovered, declares what the generic tests
need (examples, paper, a slow reference where its family requires one), and old setting names keep working."""

import dataclasses
import sys
import warnings

import pytest

import longattn
from longattn import api, registry
from longattn.calibrate import Calibration
from longattn.decode import DecodeSelector
from longattn.kv import KVPolicy
from longattn.prefill import PrefillPattern
from longattn.profiles import EXAMPLE

METHODS = [e for k in ("prefill", "kv", "decode", "calibrate") for e in registry.entries(k)]


def _build(e, ex, tmp_path):
    kw = {k: (e.cls.write_example_profile(tmp_path / f"{e.name}.json", num_layers=2, num_heads=4, num_kv_heads=2)
              if v == EXAMPLE else v) for k, v in ex.items()}
    return e.cls(**kw)


@pytest.mark.parametrize("e", METHODS, ids=[f"{e.kind}-{e.name}" for e in METHODS])
def test_every_method_declares_examples_paper_and_docs(e, tmp_path):
    cls = e.cls
    assert "examples" in cls.__dict__ and cls.examples, f"{e.name}: declare its own examples (settings for the tests)"
    for ex in cls.examples:
        inst = _build(e, ex, tmp_path)
        assert api.parse_method(api._spec_of(inst), e.kind) == inst if "profile" not in ex else True
    assert e.paper and e.summary, f"{e.name}: registered without a paper or summary"
    module = sys.modules[cls.__module__]
    assert (module.__doc__ or "").strip(), f"{e.name}: the module docstring names the paper and the departures"
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen


@pytest.mark.parametrize("e", registry.entries("prefill"), ids=lambda e: e.name)
def test_prefill_patterns_have_a_slow_reference_and_a_full_setting(e):
    cls = e.cls
    own = (cls.reference_mask is not PrefillPattern.reference_mask
           or cls.reference_output is not PrefillPattern.reference_output)
    assert own, f"{e.name}: a prefill pattern needs reference_mask (or reference_output), its definition loop by loop"
    assert cls.full_example is not None or "full_example" in cls.__dict__, \
        f"{e.name}: declare full_example (settings computing every pair), or None explicitly"


@pytest.mark.parametrize("e", registry.entries("decode"), ids=lambda e: e.name)
def test_decode_selectors_declare_a_full_setting(e):
    assert e.cls.full_example, f"{e.name}: declare full_example (settings attending to every token)"


def test_family_bases_are_what_the_registry_holds():
    bases = {"prefill": PrefillPattern, "kv": KVPolicy, "decode": DecodeSelector, "calibrate": Calibration}
    for kind, base in bases.items():
        for e in registry.entries(kind):
            assert issubclass(e.cls, base), f"{e.name} is registered as {kind} but is not a {base.__name__}"


def test_kvpress_equivalents_are_declared_by_the_policies():
    from longattn.bench.peer_kvpress import presses

    table = presses()
    assert table["snapkv"] == "SnapKVPress" and table["pyramidkv"] == "PyramidKVPress"
    assert "duo_attention" not in table and "novelty" not in table
    for name, press in table.items():  # declared on the class itself, not inherited
        assert registry.get(name, "kv").cls.__dict__["kvpress_press"] == press


def test_a_new_file_in_a_family_is_discovered(tmp_path, monkeypatch):
    pkg = tmp_path / "fakefamily"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from longattn.registry import discover\n__all__ = discover(__name__, globals())\n")
    (pkg / "base.py").write_text("__all__ = ['Base']\nclass Base:\n    pass\n")
    (pkg / "newmethod.py").write_text(
        "from dataclasses import dataclass\nfrom longattn.registry import register\nfrom longattn.kv.base import KVPolicy\n"
        "__all__ = ['Fresh', 'helper']\n"
        "@register('fresh_for_test', 'kv', paper='a paper', summary='s')\n@dataclass(frozen=True)\n"
        "class Fresh(KVPolicy):\n    examples = ({},)\n    def score(self, q, k, v, key_valid, module=None):\n"
        "        return -k.norm(dim=-1)\n"
        "def helper():\n    pass\n")
    (pkg / "_private.py").write_text("raise RuntimeError('private modules are not imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    fam = importlib.import_module("fakefamily")
    try:
        assert fam.__all__ == ["Base", "Fresh"]  # classes only; helpers stay in their module
        assert registry.get("fresh_for_test", "kv").cls is fam.Fresh
        assert api.parse("fresh_for_test:ratio=0.5").kv == fam.Fresh(ratio=0.5)
    finally:
        registry._REGISTRY["kv"].pop("fresh_for_test", None)
        for m in [m for m in sys.modules if m.startswith("fakefamily")]:
            del sys.modules[m]


RENAMED = [("snapkv:ratio=0.5:window=8", "snapkv:ratio=0.5:obs_window=8"),
           ("streaming_llm:ratio=0.5:n_sink=2", "streaming_llm:ratio=0.5:sink=2"),
           ("h2o:ratio=0.5:n_recent=3", "h2o:ratio=0.5:recent=3"),
           ("novelty:ratio=0.5:n_sink=2", "novelty:ratio=0.5:sink=2"),
           ("vertical_slash:last_q=32:local=8", "vertical_slash:obs_window=32:window=8"),
           ("quest:page_size=8:budget=64", "quest:page=8:budget=64"),
           ("lserve_pages:page_size=32:local=64", "lserve_pages:page=32:recent=64"),
           ("token_select:local=8", "token_select:recent=8"),
           ("infllm:local=512", "infllm:recent=512"),
           ("longheads:chunk_size=64", "longheads:chunk=64"),
           ("adaptive_heads:ratio=0.5:inner=snapkv/window=8", "adaptive_heads:ratio=0.5:inner=snapkv/obs_window=8")]


@pytest.mark.parametrize("old,new", RENAMED, ids=[o.split(":")[0] + "-" + o.split(":")[-1] for o, _ in RENAMED])
def test_old_setting_names_work_with_a_deprecation_warning(old, new):
    with pytest.warns(FutureWarning, match="deprecated, use"):
        got = api.parse(old)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        want = api.parse(new)
    inner = lambda r: getattr(r.kv, "policy", r.kv)  # noqa: E731 - a wrapper keeps its inner spec as given
    assert (got.prefill, inner(got), got.decode) == (want.prefill, inner(want), want.decode)


def test_old_names_in_python_and_both_names_refused():
    with pytest.warns(FutureWarning):
        assert longattn.SnapKV(ratio=0.5, window=8) == longattn.SnapKV(ratio=0.5, obs_window=8)
    with pytest.raises(ValueError, match="window= is the old name of obs_window="):
        longattn.SnapKV(window=8, obs_window=8)


# ---- docs and the command line ------------------------------------------------------------------------------
def test_methods_md_is_generated_from_the_registry():
    from pathlib import Path

    from longattn.docs import methods_markdown

    path = Path(__file__).resolve().parents[1] / "docs" / "methods.md"
    assert path.read_text() == methods_markdown(), "docs/methods.md is stale: longattn list --markdown > docs/methods.md"


def test_every_option_of_every_subcommand_has_a_help_string():
    import argparse

    from longattn.cli import _build

    parser = _build()
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)][0]
    missing = []
    for name, sub in subs.choices.items():
        for act in sub._actions:
            if isinstance(act, argparse._HelpAction):
                continue
            if not act.help:
                missing.append(f"{name} {'/'.join(act.option_strings) or act.dest}")
    assert not missing, f"options without a help string: {missing}"
    assert all(subs._choices_actions), "every subcommand has a one-line help"


def test_docs_links_stay_inside_the_repository():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = [root / "README.md"] + sorted((root / "docs").rglob("*.md"))
    bad = []
    for f in files:
        for target in re.findall(r"\]\(([^)\s]+)\)", f.read_text()):
            if re.match(r"[a-z]+://", target) or target.startswith("#"):
                continue  # web links (papers) and anchors
            path = (f.parent / target.split("#")[0]).resolve()
            if root not in path.parents and path != root or not path.exists():
                bad.append(f"{f.relative_to(root)} -> {target}")
        if "../shared" in f.read_text():
            bad.append(f"{f.relative_to(root)} mentions ../shared")
    assert not bad, bad


def test_readme_is_a_short_front_door():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert len(readme) <= 12000, f"README.md is {len(readme)} characters; details belong in docs/"
