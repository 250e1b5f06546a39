"""Flow parameters as pydantic models: the Prefect UI renders them as a form, and a YAML/TOML file maps onto them."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, field_validator


class DataParams(BaseModel):
    """Where the data comes from and how it is sharded and preprocessed."""

    root: Path = Field(Path("outputs"), description="output root (every stage writes under it)")
    # built-in dataset (used when no user source is given)
    size: int = Field(2000, ge=8, description="built-in dataset: number of images (audio clips: half of it)")
    seed: int = Field(0, description="built-in dataset seed")
    image_size: int = Field(32, ge=8, description="image side in pixels (built-in and preprocessed)")
    # user data
    images: Path | None = Field(None, description="folder root/<class>/*.png|jpg|jpeg|webp")
    audio: Path | None = Field(None, description="folder root/<class>/*.wav|flac|ogg|mp3")
    captions: Path | None = Field(None, description="CSV or Parquet table: image path + caption")
    transcripts: Path | None = Field(None, description="CSV or Parquet table: audio path + transcript")
    shards: list[str] = Field(default_factory=list, description="existing webdataset shards (paths or globs)")
    caption_col: str = "caption"
    caption_path_col: str = "image"
    transcript_col: str = "transcript"
    transcript_path_col: str = "audio"
    # audio features
    sample_rate: int = Field(16000, ge=4000)
    n_mels: int = Field(128, ge=8)
    n_frames: int = Field(128, ge=8)
    # shards
    shard_maxcount: int = Field(1000, ge=1)
    val_fraction: float = Field(0.1, ge=0, lt=0.5)
    test_fraction: float = Field(0.1, ge=0, lt=0.5)

    @property
    def builtin(self) -> bool:
        return not (self.images or self.audio or self.captions or self.transcripts or self.shards)

    @field_validator("images", "audio", "captions", "transcripts")
    @classmethod
    def _exists(cls, v: Path | None) -> Path | None:
        if v is not None and not Path(v).exists():
            raise ValueError(f"{v} does not exist; pass an existing path")
        return v
