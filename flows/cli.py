"""`tessera` command line: thin argument parsing over the Prefect flows."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tomllib
import types
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from flows.params import CodebookParams, DataParams, EvalParams, IndexParams, PipelineParams, TrainParams
from tasks.infra import procs
from tasks.train import table


SECTIONS = {"data": DataParams, "train": TrainParams, "codebooks": CodebookParams, "eval": EvalParams,
            "index": IndexParams}


def _load_config(path: str | None) -> dict:
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"tessera: error: config file {p} does not exist; pass --config PATH to a .yaml or .toml file")
    text = p.read_text()
    if p.suffix == ".toml":
        return tomllib.loads(text)
    if p.suffix in (".yaml", ".yml"):
        return yaml.safe_load(text) or {}
    raise SystemExit(f"tessera: error: config file {p} must end in .yaml, .yml or .toml")


# Every field of the parameter models has a flag, with its description and default as help: one place defines a
# parameter (flows/params.py). Dict fields (per-model overrides) are set in a --config file only; `models` has its own
# flag where a command trains more than one model.
CONFIG_ONLY = {"train_overrides", "model_overrides", "models"}
ALIASES = {"allow_roots": ("--allow-root",)}
RUN_NAMES = ("dataset_name", "experiment")  # PipelineParams' own fields (the others are sections)


def _flag_kwargs(field) -> dict:
    """argparse keywords for one pydantic field: its type, list fields as repeated values, bools as --x/--no-x."""
    ann = field.annotation
    args = typing.get_args(ann)
    inner = next((a for a in args if a is not type(None)), ann) if typing.get_origin(ann) in (typing.Union,
                                                                                            types.UnionType) else ann
    default = field.get_default(call_default_factory=True)
    help_ = f"{field.description or ''}{f' (default: {default})' if default not in (None, []) else ''}".strip()
    if inner is bool:
        return {"action": argparse.BooleanOptionalAction, "default": None, "help": help_}
    if typing.get_origin(inner) is list:
        item = typing.get_args(inner)[0]
        choices = typing.get_args(item) if typing.get_origin(item) is typing.Literal else None
        return {"nargs": "+", "action": "extend", "choices": choices, "help": help_ + " (repeatable)"}
    if typing.get_origin(inner) is typing.Literal:
        return {"choices": typing.get_args(inner), "help": help_}
    return {"type": inner if inner in (int, float) else str, "help": help_}


def _add_fields(sp: argparse.ArgumentParser, title: str, model: type[BaseModel], only: tuple = ()) -> None:
    g = sp.add_argument_group(title, model.__doc__ if model.__doc__ and "\n" not in model.__doc__ and not only
                              else None)
    for name, field in model.model_fields.items():
        if name not in CONFIG_ONLY and (not only or name in only):
            flags = [f"--{name.replace('_', '-')}", *ALIASES.get(name, ())]
            g.add_argument(*flags, dest=name, **_flag_kwargs(field))


def _add_data_args(sp: argparse.ArgumentParser) -> None:
    _add_fields(sp, "data", DataParams)
    sp.add_argument("--config", help="YAML or TOML file with the same fields (sections data:, train:, codebooks:, "
                    "eval:, index:); flags override it")


def _add_train_args(sp: argparse.ArgumentParser) -> None:
    for title, model in SECTIONS.items():
        if title != "data":
            _add_fields(sp, title, model)
    _add_fields(sp, "names", PipelineParams, only=RUN_NAMES)


def _overlay(values: dict, args: argparse.Namespace, fields) -> dict:
    for name in fields:
        v = getattr(args, name, None)
        if v is not None:
            values[name] = v
    return values


def data_params(args: argparse.Namespace) -> DataParams:
    values = _load_config(args.config)
    return DataParams(**_overlay(values.get("data", values), args, DataParams.model_fields))


def pipeline_params(args: argparse.Namespace, models: list[str] | None = None) -> PipelineParams:
    values = _load_config(args.config)
    for title, model in SECTIONS.items():
        values[title] = _overlay(values.get(title, {}), args, [f for f in model.model_fields if f not in CONFIG_ONLY])
    if models is not None:
        values["train"]["models"] = models
    _overlay(values, args, RUN_NAMES)
    return PipelineParams(**values)


def _one_line(err: ValidationError) -> str:
    """The first error as `--flag=value: what is wrong`: flags are flat (`--steps`, not `--train.steps`), and a
    field that has no flag is named as its config key (`train.train_overrides`)."""
    e = err.errors()[0]
    loc = [str(x) for x in e["loc"]]
    if e["type"] == "extra_forbidden":
        section = _section({"PipelineParams": PipelineParams, "DataParams": DataParams}.get(err.title), loc[:-1])
        valid = ", ".join(section.model_fields) if section else "see --help"
        return f"unknown key {'.'.join(loc)!r} in the config; valid keys there: {valid}"
    field = loc[-1] if loc else "value"
    name = f"--{field.replace('_', '-')}" if field in _flags() else ".".join(loc) or "value"
    msg = e["msg"].removeprefix("Value error, ")
    return f"{name}={e.get('input')!r}: {msg}"


def _section(model, path: list[str]):
    """The parameter model at a path of field names (["train"] -> TrainParams), or None."""
    for name in path:
        field = model.model_fields.get(name) if model else None
        model = field.annotation if field is not None and isinstance(field.annotation, type) else None
    return model


class UserErrorsWithoutTraceback(logging.Filter):
    """Prefect logs a failed task's or flow's exception with its traceback. For bad input (a ValueError or a missing
    file, whose message names the value and the fix) the message is enough: this drops the traceback, and the CLI
    prints the message once more as its last line. Other exceptions keep theirs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], (ValueError, FileNotFoundError)):
            record.exc_info = record.exc_text = None
        # a failed task's exception is not a record to store (records are JSON): Prefect's warning says nothing new
        message = record.getMessage()
        return not ("Failed to serialize object of type '" in message and "Error' with serializer 'json'" in message)


def quiet_user_errors() -> None:
    """Install UserErrorsWithoutTraceback on the handlers Prefect's logging set up (console and API)."""
    import prefect.logging  # noqa: F401 - Prefect configures its logging when first imported

    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in list(logging.Logger.manager.loggerDict)
                                      if n.startswith("prefect"))]
    for handler in {h for lg in loggers for h in lg.handlers}:
        if not any(isinstance(f, UserErrorsWithoutTraceback) for f in handler.filters):
            handler.addFilter(UserErrorsWithoutTraceback())


def check_device(device: str) -> None:
    """`--device cuda` on a machine without one fails here, before any stage (a deployment's parameters are not
    checked against the machine that writes them, only where they run)."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device='cuda': no CUDA device is visible on this machine; use --device auto or cpu")


def check_models(params: PipelineParams) -> None:
    """Models named with --models that your data cannot feed: one line before any model stage. The data stages run
    first (their results are what the pipeline then reuses, Cached); the built-in set feeds every model."""
    if params.train.models is None or params.data.builtin:
        return
    import json

    from flows.data import data_flow
    from tasks.train.table import plan

    prep = Path(data_flow(params.data)["prep"]["path"])
    plan(params.train.models, json.loads((prep / "stats.json").read_text()), params.train.batch_size)


def cmd_data(args) -> int:
    from flows.data import check_data, data_flow

    params = data_params(args)
    check_data(params)
    quiet_user_errors()
    data_flow(params)
    return 0


def cmd_run(args) -> int:
    from flows.data import check_data
    from flows.pipeline import pipeline

    params = pipeline_params(args, getattr(args, "models", None))
    check_device(params.train.device)
    check_data(params.data)
    quiet_user_errors()
    check_models(params)
    result = pipeline(params)
    write_latest(Path(params.data.root), result)
    return 0


def write_latest(root: Path, result: dict) -> None:
    """root/latest.json: where the last pipeline run left its index and checkpoints (what `tessera search` reads).

    A run on the same prepared data as the one before adds to it: `tessera train tts` after `make run` replaces the
    text-to-speech checkpoint and keeps the others and the CLIP index. A run on other data starts it afresh."""
    import json

    from tasks.infra.common import write_json

    prep = result["data"]["prep"]["path"]
    path = root / "latest.json"
    try:
        before = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):  # unreadable: written afresh below
        before = {}
    kept = before if isinstance(before, dict) and before.get("prep") == prep else {}
    write_json(path, {
        "index": (result.get("index") or {}).get("path") or kept.get("index"),
        "checkpoints": {**(kept.get("checkpoints") or {}), **{m: r["checkpoint"] for m, r in result["train"].items()}},
        "prep": prep,
    })


def cmd_train(args) -> int:
    args.models = [args.model]
    return cmd_run(args)


def cmd_search(args) -> int:
    import json

    from tasks.index import format_hits, load_index, search_image, search_text

    if not args.text and not args.image:
        raise ValueError("give a query: tessera search TEXT, or tessera search --image PATH")
    latest = Path(args.root or "outputs") / "latest.json"
    index_path = args.index or (json.loads(latest.read_text()).get("index") if latest.is_file() else None)
    if not index_path:
        raise FileNotFoundError(f"no CLIP index yet (no {latest}); run `tessera run` first, or pass --index DIR")
    loaded = load_index(Path(index_path))
    if args.image:
        hits = search_image(loaded, Path(args.image), k=args.k)
    else:
        hits = search_text(loaded, " ".join(args.text), k=args.k)
    print(format_hits(hits, loaded.provenance))
    return 0


def cmd_deploy(args) -> int:
    from flows.deploy import PREFECT_FILE, deploy

    res = deploy(Path(args.prefect_file or PREFECT_FILE), args.name, args.pool, args.pool_type, args.gpu_slots)
    pools = ", ".join(f"{p} ({'created' if new else 'existing'})" for p, new in res.pools.items())
    print(f"deployed {', '.join(res.deployments)} to {res.api_url}\nwork pool: {pools}; GPU concurrency limit "
          f"(task tag tessera-train): {res.gpu_slots} slot(s)\nschedules are off until turned on; next: tessera worker")
    return 0


def cmd_worker(args) -> int:
    from prefect.client.orchestration import get_client

    from flows.deploy import repair_train_slots, worker_command

    with get_client(sync_client=True) as client:  # slots a dead holder kept (a server restart) are given back first
        repair_train_slots(client)
    argv, env = worker_command(args.pool, args.name, args.limit)
    os.execve(argv[0], argv, env)  # the worker replaces this process: signals (Ctrl-C, SIGTERM) reach it directly


def cmd_ui(args) -> int:
    print(
        "Prefect UI:  prefect server start   (then open http://127.0.0.1:4200; set PREFECT_API_URL=http://127.0.0.1:4200/api\n"
        "             in the shell that runs tessera so flow runs show up there)\n"
        "MLflow UI:   mlflow ui --backend-store-uri sqlite:///mlflow.db   (then open http://127.0.0.1:5000)"
    )
    return 0


def parameter_reference() -> str:
    """Every parameter as a markdown table (flag, config key, default, description), from the parameter models: the
    README's "Every parameter" section is this text (tests/test_cli_errors.py keeps them equal)."""
    rows = ["| flag | config key | default | what |", "|---|---|---|---|"]
    groups = [(title, m, m.model_fields) for title, m in SECTIONS.items()]
    groups.append(("", PipelineParams, {k: PipelineParams.model_fields[k] for k in RUN_NAMES}))
    for title, _, fields in groups:
        for name, field in fields.items():
            flag = f"`--{name.replace('_', '-')}`" if name not in CONFIG_ONLY or name == "models" else "(config file)"
            default = field.get_default(call_default_factory=True)
            shown = "" if default in (None, [], {}) else f"`{default}`"
            key = f"{title}.{name}" if title else name
            what = " ".join((field.description or "").split()).replace("|", "\\|")
            rows.append(f"| {flag} | `{key}` | {shown} | {what} |")
    return "\n".join(rows)


def _flags() -> set[str]:
    """Every field name that has a flag (the parsers' dests)."""
    return {a.dest for sp in _subparsers(build_parser()) for a in sp._actions}


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return [p for s in subs for p in s.choices.values()]


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (no usage block): `tessera: error: WHAT; see tessera run --help`."""

    def error(self, message: str):
        self.exit(2, f"tessera: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="tessera", description="Multimodal transformers, end to end.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    sp = sub.add_parser("data", help="ingest, shard and preprocess a dataset (built-in by default)")
    _add_data_args(sp)
    sp.set_defaults(func=cmd_data)
    sp = sub.add_parser("run", help="run the whole pipeline on the built-in dataset (or your data)")
    _add_data_args(sp)
    _add_train_args(sp)
    sp.add_argument("--models", nargs="+", choices=list(table.MODELS), help="train only these (default: every model the data can "
                    "feed; the run prints why it leaves one out)")
    sp.set_defaults(func=cmd_run)
    sp = sub.add_parser("train", help="train (and evaluate) one model; the data and codebook stages run as needed")
    sp.add_argument("model", choices=list(table.MODELS))
    _add_data_args(sp)
    _add_train_args(sp)
    sp.set_defaults(func=cmd_train)
    for name, text in (("eval", "evaluate the trained models (training stages come from the cache)"),
                       ("index", "build the CLIP index (training stages come from the cache)")):
        sp = sub.add_parser(name, help=text)
        _add_data_args(sp)
        _add_train_args(sp)
        sp.set_defaults(func=cmd_run, models=[table.with_role("image-text")] if name == "index" else None)
    sp = sub.add_parser("search", help="search the images by text (or by an image) in the CLIP index")
    sp.add_argument("text", nargs="*", help="the query, e.g. a red circle")
    sp.add_argument("--image", help="query by an image file instead")
    sp.add_argument("--k", type=int, default=5, help="number of hits (default 5)")
    sp.add_argument("--root", help="output root (default: outputs)")
    sp.add_argument("--index", help="an index folder (default: the last run's, from ROOT/latest.json)")
    sp.set_defaults(func=cmd_search)
    sp = sub.add_parser("ui", help="how to open the Prefect and MLflow UIs")
    sp.set_defaults(func=cmd_ui)
    sp = sub.add_parser("deploy", help="register deploy/prefect.yaml with the Prefect server in PREFECT_API_URL")
    sp.add_argument("--prefect-file", help="deployment file (default: deploy/prefect.yaml)")
    sp.add_argument("--name", nargs="+", help="only these deployments (default: all)")
    sp.add_argument("--pool", help="work pool for every deployment (default: the file's, tessera)")
    sp.add_argument("--pool-type", default="process", help="type of a work pool created here: process (default), "
                    "docker or kubernetes")
    sp.add_argument("--gpu-slots", type=int, help="training task runs at once across the pool (default 1 when new)")
    sp.set_defaults(func=cmd_deploy)
    sp = sub.add_parser("worker", help="start a Prefect worker that runs the deployments' flow runs on this machine")
    sp.add_argument("--pool", default="tessera", help="work pool to poll (default: tessera)")
    sp.add_argument("--name", help="worker name (default: Prefect's)")
    sp.add_argument("--limit", type=int, help="flow runs at once on this worker (default: no limit)")
    sp.set_defaults(func=cmd_worker)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry: the machines may be offline
    # the embedded (ephemeral) Prefect API can take longer than its 20 s default to start on a busy 2-core machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    procs.guard_temporary_server()  # a temporary Prefect server this command starts ends with it, even on SIGKILL
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValidationError as err:
        print(f"tessera: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as err:
        print(f"tessera: error: {err}", file=sys.stderr)
        return 2


def write_readme_parameters(readme: Path = Path(__file__).resolve().parents[1] / "README.md") -> None:
    """Replace the README's parameter table (between `<!-- parameters -->` markers) with `parameter_reference()`."""
    head, rest = readme.read_text().split("<!-- parameters -->", 1)
    tail = rest.split("<!-- /parameters -->", 1)[1]
    readme.write_text(f"{head}<!-- parameters -->\n{parameter_reference()}\n<!-- /parameters -->{tail}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-readme-parameters"]:
        write_readme_parameters()
        sys.exit(0)
    sys.exit(main())
