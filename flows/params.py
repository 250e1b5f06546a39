"""Flow parameters as pydantic models: the Prefect UI renders them as a form, and a YAML/TOML file maps onto them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from tasks.data.preprocess import PrepConfig
from tasks.infra import storage
from tasks.train import table


MEL_PATCH = PrepConfig.mel_patch  # the clip window is a whole number of spectrogram patches


class Params(BaseModel):
    """A section of the parameters: a key it does not know (a typo in a config file) is an error, not ignored."""

    model_config = ConfigDict(extra="forbid")


class DataParams(Params):
    """Where the data comes from and how it is sharded and preprocessed."""

    root: Path = Field(Path("outputs"), description="output root (every stage writes under it)")
    store: str | None = Field(
        None, description="where the shards, manifest and model-ready shards go: a folder or an fsspec URL "
        "(s3://bucket/prefix, gs://..., file://..., memory://...); default: the output root",
    )
    # built-in dataset (used when no user source is given)
    size: int = Field(8000, ge=8, description="built-in dataset: number of images (audio clips: half of it, at most "
                      "1,000)")
    seed: int = Field(0, description="built-in dataset seed")
    image_size: int = Field(32, ge=8, description="image side in pixels (built-in and preprocessed)")
    # user data
    images: Path | None = Field(None, description="folder root/<class>/*.png|jpg|jpeg|webp")
    audio: Path | None = Field(None, description="folder root/<class>/*.wav|flac|ogg|mp3")
    captions: Path | None = Field(None, description="CSV or Parquet table: image path + caption")
    transcripts: Path | None = Field(None, description="CSV or Parquet table: audio path + transcript")
    shards: list[str] = Field(default_factory=list, description="existing webdataset shards (paths or globs)")
    caption_col: str = Field("caption", description="the captions table's caption column")
    caption_path_col: str = Field("image", description="the captions table's column of image paths (relative to "
                                  "the table's folder)")
    transcript_col: str = Field("transcript", description="the transcripts table's transcript column")
    transcript_path_col: str = Field("audio", description="the transcripts table's column of audio paths")
    # what ingest may read (README: What happens to bad input)
    allow_roots: list[Path] = Field(
        default_factory=list, description="more folders a table row or a symlink may point into (besides the "
        "folders and the tables' folders named here)",
    )
    max_clip_seconds: float = Field(30.0, gt=0, description="longer audio clips are quarantined")
    max_pixels: int = Field(40_000_000, ge=1, description="larger images are quarantined from their header")
    max_file_mb: int = Field(256, ge=1, description="larger files and tar members are quarantined unread")
    decoder_threads: int = Field(0, ge=0, description="ingest decoding threads (0: min(4, CPUs))")
    # audio features
    sample_rate: int = Field(16000, ge=4000, description="audio is resampled to this rate (Hz)")
    n_mels: int = Field(128, ge=8, description="mel bands of the log-mel spectrogram")
    n_frames: int | None = Field(None, ge=16, description="the clip window in spectrogram frames of 10 ms, a "
                                 "multiple of 16 (128: 1.28 s); shorter clips are zero-padded to it, the audio "
                                 "classifier trains on random crops of longer ones and averages over their windows, "
                                 "speech models read the first window; default: from the data, the frames that hold "
                                 "the 95th percentile of the train clips' durations (rounded up to 16, at most 1024)")
    clip_seconds: float | None = Field(None, gt=0, description="the clip window in seconds instead of --n-frames "
                                       "(rounded up to whole 16-frame patches)")
    # shards
    shard_maxcount: int = Field(1000, ge=1, description="samples per webdataset shard")
    val_fraction: float = Field(0.1, ge=0, lt=0.5, description="share of items in the val split (by a hash of "
                                "their key; a table's split column overrides it)")
    test_fraction: float = Field(0.1, ge=0, lt=0.5, description="share of items in the test split (likewise)")
    name_pattern: str | None = Field(None, description="read fields from file names into each item's metadata, "
                                     "e.g. '{label}_{speaker}_{take}' (a label field labels the item)")
    split_by: str | None = Field(None, description="keep every group wholly in one split: a metadata field (a table "
                                 "column or a --name-pattern field) or 'label'; groups split by a hash with the "
                                 "fractions, or as named by --test-groups/--val-groups")
    test_groups: list[str] = Field(default_factory=list, description="groups of --split-by for the test split, e.g. "
                                   "--test-groups theo (or theo,lucas); the other groups train")
    val_groups: list[str] = Field(default_factory=list, description="groups of --split-by for the val split")
    normalise_by: str | None = Field(None, description="a metadata field, e.g. speaker: each group's mean log-mel per "
                                     "mel band, over all its clips (a held-out speaker's too: their audio, never their "
                                     "labels), is moved to the train split's (speaker-level cepstral mean "
                                     "normalisation, as Kaldi's utt2spk CMVN); for speakers or microphones the model "
                                     "never heard")

    @property
    def builtin(self) -> bool:
        return not (self.images or self.audio or self.captions or self.transcripts or self.shards)

    @field_validator("store")
    @classmethod
    def _store(cls, v: str | None) -> str | None:
        if v is not None:
            storage.check(v)  # a URL whose fsspec package is missing: one line naming it, before any work
        return v

    @field_validator("images", "audio", "captions", "transcripts")
    @classmethod
    def _exists(cls, v: Path | None) -> Path | None:
        if v is not None and not Path(v).exists():
            raise ValueError(f"{v} does not exist; pass an existing path")
        return v

    @field_validator("test_groups", "val_groups")
    @classmethod
    def _comma_lists(cls, v: list[str]) -> list[str]:
        return [g.strip() for item in v for g in item.split(",") if g.strip()]

    @field_validator("n_frames")
    @classmethod
    def _whole_patches(cls, v: int | None) -> int | None:
        if v is not None and v % MEL_PATCH:
            lo = v - v % MEL_PATCH
            raise ValueError(f"the clip window must be a multiple of the {MEL_PATCH}-frame mel patch; pass "
                             f"{lo or MEL_PATCH} or {lo + MEL_PATCH}")
        return v

    @field_validator("clip_seconds")
    @classmethod
    def _one_window(cls, v: float | None, info: ValidationInfo) -> float | None:
        n_frames = info.data.get("n_frames")
        if v is not None and n_frames is not None:
            raise ValueError(f"--n-frames {n_frames} and --clip-seconds {v:g} both set the clip window; "
                             "pass one of them")
        return v

    @field_validator("normalise_by")
    @classmethod
    def _not_the_label(cls, v: str | None) -> str | None:
        if v == "label":
            raise ValueError("--normalise-by label would tell the test clips' labels through their means; name a "
                             "field such as speaker")
        return v

    @model_validator(mode="after")
    def _groups_need_split_by(self) -> "DataParams":
        if (self.test_groups or self.val_groups) and not self.split_by:
            raise ValueError("--test-groups/--val-groups name groups of --split-by FIELD; pass --split-by too")
        return self

    @field_validator("root")
    @classmethod
    def _root_is_a_folder(cls, v: Path) -> Path:
        if Path(v).exists() and not Path(v).is_dir():
            raise ValueError(f"{v} is a file; the output root must be a folder (pass --root DIR)")
        return v

    @field_validator("allow_roots")
    @classmethod
    def _folders(cls, v: list[Path]) -> list[Path]:
        for p in v:
            if not Path(p).is_dir():
                raise ValueError(f"{p} is not an existing folder; pass --allow-root DIR")
        return v




class CodebookParams(Params):
    pixels_k: int = Field(64, ge=2, description="ImageGPT colour palette size")
    image_k: int = Field(256, ge=2, description="image patch codebook size (text-to-image tokens)")
    iters: int = Field(25, ge=1, description="k-means iterations")
    min_usage: float = Field(0.25, ge=0, le=1, description="fail the stage below this fraction of codes used")


class TrainParams(Params):
    # the model table (tasks/train/table.py) is the only list of model names; it is read when a form is filled
    models: list[str] | None = Field(None, description=f"any of {list(table.MODELS)}; default: every model the "
                                     "data can feed (labels: classifiers; captions: CLIP, text-to-image; "
                                     "transcripts: speech recognition and synthesis)")
    preset: Literal["default", "tiny"] = Field("default", description="model sizes: default (CPU minutes) or tiny "
                                               "(tests)")
    steps: int | None = Field(None, ge=1, description="optimiser steps for every model; wins over --epochs "
                              "(default: each model's epochs budget)")
    batch_size: int | None = Field(None, ge=1, description="samples per step for every model (default: each "
                                   "model's own)")
    epochs: float | None = Field(None, gt=0, description="passes over the train split for every model, within its "
                                 "step cap (default: each model's own, tasks/train/table.py)")
    patience: int | None = Field(None, ge=0, description="stop a model after this many evaluations without a "
                                 "better val metric; 0: never (default: each model's own, 5)")
    train_minutes: float | None = Field(None, gt=0, description="minutes for all the models' training together, "
                                        "shared by each one's time in the default run (table `minutes`), what a "
                                        "model leaves unused going to the ones after it; a model that would not fit "
                                        "its share trains fewer steps (default: 15 a model)")
    run_minutes: float | None = Field(None, gt=0, description="minutes for the whole run on this machine: the models "
                                      "train in what is left after the other work (data, evaluation, round trips) "
                                      "would take here, judged by a probe of this machine's training speed (run once "
                                      "per output root, kept in ROOT/machine.json) and shared as --train-minutes; "
                                      "make run passes 19.5")
    lanes: int | None = Field(None, ge=1, description="models that train side by side, each in its own lane with "
                              "the whole of --train-minutes; default: on a CPU one a core (each trains on one "
                              "thread), on a GPU one; under torchrun always one. Each training draws from "
                              "generators of its own (`models/rng.py`), so a model ends the same in any lane beside "
                              "any other")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto (a GPU if there is one), cpu or cuda")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto (bf16 where the model's own "
                                                       "training step runs faster, timed before training), bf16 or "
                                                       "fp32")
    compile: bool = Field(False, description="torch.compile the training step (its dropout then draws from torch's "
                          "global generator: `models/rng.py`)")
    init_from_trained: bool = Field(True, description="start CLIP's image-tower stem from the trained ViT; "
                                    "off: CLIP from scratch")
    train_overrides: dict[str, dict] = Field(default_factory=dict, description='per model: {"vit": {"lr": 3e-4}}')
    model_overrides: dict[str, dict] = Field(default_factory=dict, description='per model: {"vit": {"depth": 6}}')

    @field_validator("models")
    @classmethod
    def _known(cls, v: list[str] | None) -> list[str] | None:
        bad = [m for m in v or [] if m not in table.MODELS]
        if bad:
            raise ValueError(f"unknown model(s) {bad}; choose from {list(table.MODELS)}")
        return v

    @field_validator("train_overrides")
    @classmethod
    def _train_fields(cls, v: dict[str, dict]) -> dict[str, dict]:
        """Each model's overrides make a valid TrainConfig (known fields, the model's augment settings), before any
        work."""
        from tasks.train.trainer import default_train_config

        cls._known(list(v))
        for model, fields in v.items():
            try:
                default_train_config(model, **fields)
            except (TypeError, ValueError) as exc:  # TypeError: an unknown field
                raise ValueError(f"train_overrides[{model!r}]: {exc}") from None
        return v


class EvalParams(Params):
    max_samples: int | None = Field(None, ge=1, description="cap on test samples per model (default: the whole "
                                    "test split)")
    roundtrips: bool = Field(True, description="text-to-image -> ViT/CLIP and text-to-speech -> ASR")


class IndexParams(Params):
    exact_threshold: int = Field(50_000, ge=1, description="exact search below this many images, HNSW above")
    splits: list[Literal["train", "val", "test"]] = Field(
        ["train"], min_length=1, description="the splits whose images are indexed (default: train only, so the test "
        "split stays unseen)")


DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def default_dataset_name(data: DataParams) -> str:
    """`builtin`, or the name of the first input folder (a table's folder, a shard glob's folder), made a valid
    registry name: `--audio ~/data/fsdd4/recordings` -> `recordings`, `--transcripts fsdd4/t.csv` -> `fsdd4`."""
    if data.builtin:
        return "builtin"
    folder = data.images or data.audio
    source = Path(folder) if folder else Path(data.captions or data.transcripts or data.shards[0]).parent
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", source.resolve().name).strip("-._")[:64]
    return name or "data"


class PipelineParams(Params):
    """Everything `tessera run` does; the Prefect UI shows it as a form, `--config FILE` fills it."""

    data: DataParams = Field(default_factory=DataParams)
    codebooks: CodebookParams = Field(default_factory=CodebookParams)
    train: TrainParams = Field(default_factory=TrainParams)
    eval: EvalParams = Field(default_factory=EvalParams)
    index: IndexParams = Field(default_factory=IndexParams)
    dataset_name: str | None = Field(None, description="a short name for the data, tagged on every MLflow run and "
                                     "naming the experiment and registered models (default: builtin, or the input "
                                     "folder's name)")
    experiment: str | None = Field(None, description="MLflow experiment (default: tessera-<dataset name>)")

    @model_validator(mode="after")
    def _names(self) -> PipelineParams:
        """The dataset's name (checked, or from the data) and the experiment it implies."""
        if self.dataset_name is None:
            self.dataset_name = default_dataset_name(self.data)
        elif not DATASET_NAME.fullmatch(self.dataset_name):
            raise ValueError(f"--dataset-name {self.dataset_name!r}: use 1-64 letters, digits, '.', '_' or '-', "
                             "starting with a letter or digit")
        if self.experiment is None:
            self.experiment = f"tessera-{self.dataset_name}"
        return self

    @model_validator(mode="after")
    def _local_store(self) -> PipelineParams:
        if self.data.store is not None and storage.is_remote(self.data.store):
            raise ValueError(f"data.store={self.data.store}: the pipeline's model stages read a local prep folder; "
                             "use a local store here (`tessera data` writes to URLs, and train() reads them)")
        return self
