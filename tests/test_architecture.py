"""The layering of docs/ARCHITECTURE.md, checked on the source: cli -> pipeline -> engine ->
data / models / store / losses / metrics, and stage modules that never import each other.

Imports are read from the syntax tree (module level and inside functions alike), so a lazy import
cannot hide a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from helpers import ROOT

PACKAGE = ROOT / "chx"
# Every module of chx/pipeline is a stage, except those that compose stages (demo, compare) and the
# helpers stages share (report, aggregate): a new stage is checked without being listed here.
NOT_STAGES = {"__init__", "demo", "compare", "report", "aggregate"}
STAGES = {p.stem for p in (PACKAGE / "pipeline").glob("*.py")} - NOT_STAGES
LOWER = ("chx.data", "chx.models", "chx.store", "chx.losses", "chx.metrics")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def chx_imports(path: Path) -> set[str]:
    """Every chx module a file imports (``from chx.x import y`` gives chx.x and chx.x.y)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m == "chx" or m.startswith("chx.")}


MODULES = {module_name(p): chx_imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_the_scan_sees_the_package():
    assert "chx.engine.trainer" in MODULES and "chx.pipeline.extract" in MODULES
    assert "chx.engine.inference" in MODULES["chx.pipeline.extract"]


@pytest.mark.parametrize("lower", LOWER)
def test_lower_layers_never_import_pipeline_engine_or_cli(lower):
    bad = {m: sorted(i for i in imps if within(i, "chx.pipeline") or within(i, "chx.engine")
                     or within(i, "chx.cli"))
           for m, imps in MODULES.items() if within(m, lower)}
    assert not {m: v for m, v in bad.items() if v}


def test_engine_never_imports_pipeline_or_cli():
    bad = {m: sorted(i for i in imps if within(i, "chx.pipeline") or within(i, "chx.cli"))
           for m, imps in MODULES.items() if within(m, "chx.engine")}
    assert not {m: v for m, v in bad.items() if v}


def test_stage_modules_never_import_each_other():
    for stage in STAGES:
        imps = MODULES[f"chx.pipeline.{stage}"]
        others = sorted(i for i in imps for s in STAGES - {stage} if within(i, f"chx.pipeline.{s}"))
        assert not others, f"chx.pipeline.{stage} imports {others}"


def test_store_knows_nothing_of_models():
    bad = {m: sorted(i for i in imps if within(i, "chx.models"))
           for m, imps in MODULES.items() if within(m, "chx.store")}
    assert not {m: v for m, v in bad.items() if v}


def test_only_the_cli_knows_click():
    users = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "click" or n.startswith("click.") for n in names):
                users.append(module_name(path))
    assert sorted(set(users)) == sorted(CLI_MODULES)


# The CLI's modules: parsing and printing only.
CLI_MODULES = {m for m in MODULES if within(m, "chx.cli")}
# What the CLI may import: the stages (chx.pipeline) and the plain modules beside them; never data,
# models, store or engine directly (it reaches them through pipeline functions).
CLI_MAY_IMPORT = ("chx.pipeline", "chx.options", "chx.errors", "chx.config", "chx.atomic", "chx.workers")


def test_cli_reaches_data_models_and_store_only_through_the_pipeline():
    assert "chx.cli" in CLI_MODULES and any("chx.pipeline.prepare" in MODULES[m] for m in CLI_MODULES)
    bad = {m: sorted(i for i in MODULES[m] if i != "chx" and not any(within(i, p) for p in CLI_MAY_IMPORT)
                     and i not in CLI_MODULES and not any(within(i, c) for c in CLI_MODULES))
           for m in CLI_MODULES}
    assert not {m: v for m, v in bad.items() if v}


CANONICAL = {"PA", "AP", "LATERAL", "LL", "OTHER"}


def _strings(nodes) -> list[str]:
    return [n.value for n in nodes if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def test_one_view_vocabulary():
    """Only chx.data.views spells out the view vocabulary: no other module holds a list of (nearly)
    all canonical views, or a map to or from them (the copies that once disagreed)."""
    spelled = []
    for path in PACKAGE.rglob("*.py"):
        if module_name(path) == "chx.data.views":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Dict):
                keys, values = _strings(node.keys), _strings(node.values)
                copy = sum(k in CANONICAL for k in keys) >= 2 or sum(v in CANONICAL for v in values) >= 2
            elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                copy = len(CANONICAL & set(_strings(node.elts))) >= 4
            else:
                copy = False
            if copy:
                spelled.append(f"{module_name(path)}:{node.lineno}")
    assert not spelled, f"view names spelled outside chx.data.views: {spelled}"


def _occurrences(needle: str) -> list[str]:
    return [f"{module_name(p)}:{i}" for p in sorted(PACKAGE.rglob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if needle in line]


def test_channels_last_has_one_home():
    """Images and models go to the device in channels_last (on CUDA) through chx.engine.inference's
    ``images_to`` / ``model_to`` only: no stage, nor the trainer, spells the memory format again."""
    spelled = {m.split(":")[0] for m in _occurrences("memory_format=torch.channels_last")}
    assert spelled == {"chx.engine.inference"}


@pytest.mark.parametrize("wording", ["no training ", "no validation "])
def test_stages_share_the_split_messages(wording):
    """The empty-training-split error and the no-validation warning have one wording each
    (chx.engine.trainer's ``require_training_split`` / ``warn_no_validation``), used by every stage."""
    spelled = [m for m in _occurrences(wording) if m.startswith("chx.pipeline.train")]
    assert not spelled, f"stages spell {wording!r} themselves: {spelled}"
    for stage in ("train_backbone", "train_fusion", "train_joint"):
        text = (PACKAGE / "pipeline" / f"{stage}.py").read_text()
        assert "require_training_split(" in text and "warn_no_validation(" in text, stage


def test_every_training_stage_is_a_stage_description_handed_to_fit_stage():
    """train-backbone, -fusion and -joint end the same way: a ``Stage`` given to ``fit_stage``
    (chx.engine.trainer), never ``fit`` with its arguments built by hand."""
    for stage in ("train_backbone", "train_fusion", "train_joint"):
        tree = ast.parse((PACKAGE / "pipeline" / f"{stage}.py").read_text())
        called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        assert {"Stage", "fit_stage"} <= called and "fit" not in called, stage
