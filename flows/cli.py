"""`tessera` command line: thin argument parsing over the Prefect flows."""

from __future__ import annotations

import argparse
import os
import sys
import tomllib
from pathlib import Path

import yaml
from pydantic import ValidationError

from flows.params import DataParams


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


def _add_data_args(sp: argparse.ArgumentParser) -> None:
    g = sp.add_argument_group("data")
    g.add_argument("--root", help="output root (default: outputs)")
    g.add_argument("--size", type=int, help="built-in dataset: number of images (default 2000)")
    g.add_argument("--seed", type=int, help="built-in dataset seed")
    g.add_argument("--image-size", type=int, dest="image_size")
    g.add_argument("--images", help="image folder root/<class>/*.png")
    g.add_argument("--audio", help="audio folder root/<class>/*.wav")
    g.add_argument("--captions", help="CSV/Parquet table with image path and caption columns")
    g.add_argument("--transcripts", help="CSV/Parquet table with audio path and transcript columns")
    g.add_argument("--shards", nargs="+", help="existing webdataset shards (paths or globs)")
    g.add_argument("--caption-col", dest="caption_col")
    g.add_argument("--caption-path-col", dest="caption_path_col")
    g.add_argument("--transcript-col", dest="transcript_col")
    g.add_argument("--transcript-path-col", dest="transcript_path_col")
    g.add_argument("--sample-rate", type=int, dest="sample_rate")
    g.add_argument("--shard-maxcount", type=int, dest="shard_maxcount")
    g.add_argument("--config", help="YAML or TOML file with the same fields; flags override it")


def data_params(args: argparse.Namespace) -> DataParams:
    values = _load_config(args.config)
    values = values.get("data", values)
    for name in DataParams.model_fields:
        v = getattr(args, name, None)
        if v is not None:
            values[name] = v
    return DataParams(**values)


def _one_line(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(x) for x in e["loc"]) or "value"
    return f"--{loc.replace('_', '-')}={e.get('input')!r}: {e['msg']}"


def cmd_data(args) -> int:
    from flows.data import data_flow

    data_flow(data_params(args))
    return 0


def cmd_ui(args) -> int:
    print(
        "Prefect UI:  prefect server start   (then open http://127.0.0.1:4200; set PREFECT_API_URL=http://127.0.0.1:4200/api\n"
        "             in the shell that runs tessera so flow runs show up there)\n"
        "MLflow UI:   mlflow ui --backend-store-uri sqlite:///mlflow.db   (then open http://127.0.0.1:5000)"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tessera", description="Multimodal transformers, end to end.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sp = sub.add_parser("data", help="ingest, shard and preprocess a dataset (built-in by default)")
    _add_data_args(sp)
    sp.set_defaults(func=cmd_data)
    sp = sub.add_parser("run", help="run the whole pipeline on the built-in dataset (or your data)")
    _add_data_args(sp)
    sp.set_defaults(func=cmd_data)
    sp = sub.add_parser("ui", help="how to open the Prefect and MLflow UIs")
    sp.set_defaults(func=cmd_ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry: the machines may be offline
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValidationError as err:
        print(f"tessera: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as err:
        print(f"tessera: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
