"""The code's shape as specifications: packages import one way down, one model table, short functions."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from tasks.train import table

REPO = Path(__file__).resolve().parents[1]
# lowest first: a module may import its own package and the packages before it, never one after it
LAYERS = ("models", "tasks.infra", "tasks.data", "tasks.train", "tasks.eval", "tasks.index", "tasks.stages", "flows")
MAX_LINES = 60  # per function; a longer one carries a `# long:` comment on its def line saying why


def _modules(package: str) -> list[Path]:
    return sorted((REPO / package.replace(".", "/")).rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(source: str) -> set[str]:
    """Every module a source imports, absolute names (`from tasks.data import loader` -> tasks.data.loader)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found


def layer(module: str) -> int | None:
    """The index in LAYERS of the package a module belongs to (None: not the project's)."""
    matches = [i for i, p in enumerate(LAYERS) if module == p or module.startswith(p + ".")]
    return matches[-1] if matches else None


def upward_imports(sources: dict[str, str]) -> list[str]:
    """{module name: source} -> 'importer -> imported' for every import of a higher layer than the importer's."""
    bad = []
    for module, source in sources.items():
        me = layer(module)
        for name in _imports(source):
            them = layer(name)
            if me is not None and them is not None and them > me:
                bad.append(f"{module} -> {name}")
    return sorted(bad)


def test_layers_cover_every_package():
    packages = {_module_name(p.parent) for pkg in ("tasks", "flows", "models") for p in _modules(pkg)}
    assert all(layer(p) is not None for p in packages - {"tasks"}), packages


def test_no_package_imports_a_higher_one():
    sources = {_module_name(p): p.read_text() for pkg in ("models", "tasks", "flows") for p in _modules(pkg)}
    assert len(sources) > 40
    assert upward_imports(sources) == []


def test_the_import_check_catches_an_upward_import():
    """The rule above can fail: a data module importing the trainer, or models importing tasks, is reported."""
    probe = {"tasks.data.probe": "from tasks.train import trainer\nimport tasks.infra.storage\nfrom tasks.data import loader",
             "models.probe": "import torch\nfrom tasks.infra.common import digest"}
    assert upward_imports(probe) == ["models.probe -> tasks.infra.common", "models.probe -> tasks.infra.common.digest",
                                     "tasks.data.probe -> tasks.train", "tasks.data.probe -> tasks.train.trainer"]


def test_every_function_is_short_or_says_why():
    long = []
    for path in [p for pkg in ("tasks", "flows") for p in _modules(pkg)]:
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES and "# long:" not in lines[node.lineno - 1]:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({n} lines)")
    assert long == []


def test_matplotlib_backend_is_never_set_at_import():
    offenders = [str(p.relative_to(REPO)) for pkg in ("tasks", "flows") for p in _modules(pkg)
                 if "matplotlib.use(" in p.read_text() or "import matplotlib.pyplot" in p.read_text()]
    assert offenders == []


# ---------------------------------------------------------------------------------------------------- model table
MODEL_NAMES = set(table.MODELS)
# Strings equal to a model name that are not model names: the round trips' names (metric prefixes), a retrieval
# direction, and the word "clip" for an audio clip.
NOT_MODEL_NAMES = {("tasks/eval/roundtrip.py", "t2i"), ("tasks/eval/roundtrip.py", "tts"),
                   ("tasks/data/builtin/synthetic.py", "clip"), ("tasks/data/preprocess.py", "clip"),
                   ("tasks/eval/evaluate.py", "t2i")}  # text-to-image retrieval recall


def _name_literals(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and n.body and isinstance(n.body[0], ast.Expr)}
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and n.value in MODEL_NAMES and id(n) not in docs]


def test_model_names_are_written_only_in_the_table():
    table_file = REPO / "tasks" / "train" / "table.py"
    found = [f"{p.relative_to(REPO)}:{line} {v!r}" for pkg in ("tasks", "flows") for p in _modules(pkg)
             if p != table_file for line, v in _name_literals(p)
             if (str(p.relative_to(REPO)), v) not in NOT_MODEL_NAMES]
    assert found == []


@pytest.fixture
def extra_model(monkeypatch):
    """A model added to the table only: a second ViT named "vit2"."""
    models = {**table.MODELS, "vit2": dataclasses.replace(table.MODELS["vit"], role=None)}
    monkeypatch.setattr(table, "MODELS", models)
    return "vit2"


def test_a_model_added_to_the_table_is_everywhere(extra_model):
    from flows.cli import build_parser
    from flows.params import TrainParams
    from flows.pipeline import train_order
    from tasks.eval.evaluate import EVALUATIONS

    args = build_parser().parse_args(["run", "--models", "vit", extra_model])
    assert args.models == ["vit", extra_model]
    assert build_parser().parse_args(["train", extra_model]).model == extra_model
    assert TrainParams().models is None  # every model the data can feed: table.plan
    assert table.plan(None, {})[1][extra_model] == "the data has no image items in its train split"
    assert TrainParams(models=[extra_model]).models == [extra_model]
    assert train_order([extra_model, "clip", "vit"]) == ["vit", extra_model, "clip"]
    assert table.spec(extra_model).evaluation in EVALUATIONS


def test_unknown_models_are_refused_everywhere():
    from pydantic import ValidationError

    from flows.cli import build_parser
    from flows.params import TrainParams

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "resnet"])
    with pytest.raises(ValidationError, match="unknown model"):
        TrainParams(models=["resnet"])
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        table.spec("resnet")


def test_every_evaluation_and_role_the_table_names_exists():
    from tasks.eval.evaluate import EVALUATIONS
    from tasks.eval.roundtrip import ROLES, ROUND_TRIPS

    assert {s.evaluation for s in table.MODELS.values()} == set(EVALUATIONS)
    assert {s.role for s in table.MODELS.values() if s.role} == set(ROLES)
    for trip in ROUND_TRIPS.values():  # every round trip can be run with the models of the table
        assert all(table.with_role(r) for r in trip.roles), trip.roles
