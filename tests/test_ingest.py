"""Ingest: folders, tables and shards in; one validated, sorted items table and a quarantine out."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from PIL import Image

from tasks.infra.common import sha256_bytes
from tasks.data.ingest import IngestConfig, IngestError, Sources, digest_sources, ingest
from tests.tiny_inputs import (decode_payload, img2dataset_sample, read_items, read_quarantine, save_audio,
                               save_image, write_tar)

CFG = IngestConfig()


# ---- images --------------------------------------------------------------------------------------------------------


def test_images_of_every_mode_land_as_rgb(tmp_path):
    root = tmp_path / "images"
    rgb = save_image(root / "circle" / "a.png", "RGB", (12, 10))
    rgba = Image.new("RGBA", (5, 4), (0, 0, 255, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent: must come out white
    (root / "circle").mkdir(exist_ok=True)
    rgba.save(root / "circle" / "b.png")
    save_image(root / "square" / "c.png", "L", (7, 5))
    save_image(root / "square" / "d.PNG", "P", (9, 9))  # extension match is case-insensitive
    jpg = save_image(root / "square" / "e.jpg", "RGB", (16, 8))
    save_image(root / "square" / "f.webp", "RGB", (6, 6))
    save_image(root / "square" / "g.jpeg", "CMYK", (4, 3), fmt="JPEG")
    (root / "square" / "notes.txt").write_text("not an image, not a candidate")

    res = ingest(Sources(images=root), CFG, tmp_path / "out")
    rows = {r["source"].rsplit("/", 1)[-1]: r for r in read_items(res)}
    assert res.n_items == {"image": 7, "audio": 0} and res.n_quarantined == 0
    assert sorted(rows) == ["a.png", "b.png", "c.png", "d.PNG", "e.jpg", "f.webp", "g.jpeg"]
    sizes = {"a.png": (12, 10), "b.png": (5, 4), "c.png": (7, 5), "d.PNG": (9, 9), "e.jpg": (16, 8),
             "f.webp": (6, 6), "g.jpeg": (4, 3)}
    for name, row in rows.items():
        im = decode_payload(row)
        assert im.mode == "RGB" and im.size == sizes[name] == (row["width"], row["height"])
        assert row["modality"] == "image" and row["label"] == ("circle" if name < "c" else "square")
        assert row["sha256"] == sha256_bytes(row["payload"]) and row["nbytes"] == len(row["payload"])
        assert row["duration_s"] is None and row["key"].startswith("img-") and "." not in row["key"]
    # RGB PNG/JPEG/WebP keep their bytes; everything else is re-encoded as PNG
    assert rows["a.png"]["payload"] == rgb.read_bytes() and rows["e.jpg"]["payload"] == jpg.read_bytes()
    assert [rows[n]["payload_ext"] for n in sorted(rows)] == ["png", "png", "png", "png", "jpg", "webp", "png"]
    assert decode_payload(rows["b.png"]).getpixel((0, 0)) == (255, 255, 255)
    assert decode_payload(rows["b.png"]).getpixel((1, 1)) == (0, 0, 255)
    assert decode_payload(rows["c.png"]).getpixel((0, 0)) == (90, 90, 90)
    assert decode_payload(rows["d.PNG"]).getpixel((0, 0)) == (3, 252, 7)
    assert json.loads(rows["g.jpeg"]["meta"])["orig_mode"] == "CMYK"


# ---- quarantine ----------------------------------------------------------------------------------------------------


def test_corrupt_inputs_are_quarantined_and_the_rest_lands(tmp_path):
    images, audio = tmp_path / "data" / "images", tmp_path / "data" / "audio"
    save_image(images / "ok" / "good1.png")
    save_image(images / "ok" / "good2.jpg")
    (images / "bad").mkdir(parents=True)
    (images / "bad" / "empty.png").write_bytes(b"")
    (images / "bad" / "text.jpg").write_text("this is not a jpeg\n")
    cut = save_image(images / "bad" / "cut.png", size=(64, 64), colour=None)
    noisy = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(cut)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])

    save_audio(audio / "yes" / "good.wav")
    trunc = save_audio(audio / "yes" / "trunc.wav", seconds=1.0, subtype="PCM_16")
    trunc.write_bytes(trunc.read_bytes()[: trunc.stat().st_size // 2])
    save_audio(audio / "no" / "short.wav", seconds=0.01)
    nan = np.full(1600, np.nan, dtype=np.float32)
    sf.write(audio / "no" / "nan.wav", nan, 16000, subtype="FLOAT")
    save_audio(audio / "no" / "silence.flac", freq=0.0)  # silence is valid

    captions = tmp_path / "data" / "captions.csv"
    captions.write_text("image,caption\nimages/ok/good1.png,a good one\nimages/ok/gone.png,missing\n,empty path\n")

    good = [img2dataset_sample(i) for i in range(4)]
    whole = write_tar(tmp_path / "whole.tar", good).read_bytes()
    offsets = []  # where each sample's first member header starts
    with tarfile.open(tmp_path / "whole.tar") as tf:
        offsets = [m.offset for m in tf.getmembers() if m.name.endswith(".jpg")]
    (tmp_path / "cut.tar").write_bytes(whole[: offsets[2] + 600])  # inside sample 2's image data

    res = ingest(
        Sources(images=images, audio=audio, captions=captions, shards=(str(tmp_path / "cut.tar"),)), CFG,
        tmp_path / "out",
    )
    data = f"{tmp_path / 'data'}/"
    reasons = {e["source"].removeprefix(data): e["reason"] for e in read_quarantine(res)}
    assert reasons["images/bad/empty.png"] == "file is empty (0 bytes)"
    assert reasons["images/bad/text.jpg"] == "cannot decode image: cannot identify image file"
    assert reasons["images/bad/cut.png"].startswith("cannot decode image:")
    assert reasons["audio/yes/trunc.wav"].startswith("truncated audio file")
    assert reasons["audio/no/short.wav"].startswith("audio too short: 0.010 s")
    assert reasons["audio/no/nan.wav"] == "audio contains NaN or infinite samples"
    assert reasons["captions.csv#row2"] == f"missing file: caption row 2 points at {images / 'ok' / 'gone.png'}"
    assert reasons["captions.csv#row3"] == "empty path: caption row 3 has no 'image' value"
    shard_q = [e for e in read_quarantine(res) if e["modality"] == "shard"]
    assert [e["source"] for e in shard_q] == [str(tmp_path / "cut.tar"), f"{tmp_path / 'cut.tar'}#000000002"]
    assert shard_q[0]["reason"].startswith("tar shard is corrupt or truncated")
    assert shard_q[0]["reason"].endswith("kept the 2 samples read before it")
    assert all(e["stage"] == "ingest" and "\n" not in e["reason"] for e in read_quarantine(res))

    items = read_items(res)
    assert sorted(r["source"].rsplit("/", 1)[-1] for r in items) == [
        "cut.tar#000000000", "cut.tar#000000001", "good.wav", "good1.png", "good2.jpg", "silence.flac"]
    assert res.n_items == {"image": 4, "audio": 2} and res.n_quarantined == len(reasons) == 10
    summary = json.loads((res.items_path.parent / "summary.json").read_text())
    # every input is an item or a quarantine entry; the shard itself is the one extra entry
    assert summary["n_inputs"] == 6 + 9 == sum(res.n_items.values()) + res.n_quarantined - 1
    assert summary["reasons"] == {
        "audio contains NaN or infinite samples": 1, "audio too short": 1, "cannot decode image": 2, "empty path": 1,
        "file is empty (0 bytes)": 1, "missing file": 1, "sample cut off by the shard error": 1,
        "tar shard is corrupt or truncated": 1, "truncated audio file": 1}
    joined = next(r for r in items if r["source"].endswith("good1.png"))
    assert joined["text"] == "a good one" and joined["label"] == "ok"


def test_cut_tar_header_and_duplicates(tmp_path):
    samples = [img2dataset_sample(i) for i in range(3)]
    whole = write_tar(tmp_path / "a.tar", samples + [samples[0]]).read_bytes()  # key 0 again, not adjacent
    with tarfile.open(tmp_path / "a.tar") as tf:
        last = tf.getmembers()[-1].offset
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "a.tar").write_bytes(whole[: last + 100])  # cut inside a header: tarfile stops quietly
    table = tmp_path / "caps.csv"
    save_image(tmp_path / "x.png")
    table.write_text("image,caption\nx.png,first\nx.png,second\n")
    res = ingest(Sources(captions=table, shards=(str(tmp_path / "a.tar"), str(tmp_path / "*.tar"),
                                                 str(tmp_path / "b" / "a.tar"))), CFG, tmp_path / "out")
    q = {(e["source"].removeprefix(f"{tmp_path}/"), e["reason"].split(":")[0]) for e in read_quarantine(res)}
    # key 0 again after keys 1 and 2: a split sample, refused whole in both shards (its first part taken back);
    # in b/a.tar its second part is also the sample the cut header stopped
    assert q == {("caps.csv#row2", "duplicate of an earlier row"), ("a.tar#000000000", "split sample"),
                 ("b/a.tar#000000000", "split sample"), ("b/a.tar#000000000", "sample cut off by the shard error"),
                 ("b/a.tar", "tar shard is truncated")}
    # x.png, a.tar's keys 1 and 2, b/a.tar's keys 1 and 2 (the glob's a.tar is the same file, read once)
    assert res.n_items["image"] == 1 + 2 + 2 and len({r["key"] for r in read_items(res)}) == 5


# ---- audio ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,ext,subtype", [("WAV", "wav", "PCM_16"), ("FLAC", "flac", None), ("OGG", "ogg", None),
                                              ("MP3", "mp3", None)])
def test_stereo_44k_comes_out_mono_16k_with_its_frequency(tmp_path, fmt, ext, subtype):
    save_audio(tmp_path / "a" / "tone" / f"x.{ext}", sr=44100, seconds=0.5, channels=2, freq=1000.0, fmt=fmt,
               subtype=subtype)
    res = ingest(Sources(audio=tmp_path / "a"), CFG, tmp_path / "out")
    (row,) = read_items(res)
    y, sr = sf.read(io.BytesIO(row["payload"]), dtype="float32")
    assert sr == 16000 and y.ndim == 1 and row["payload_ext"] == "wav" and row["label"] == "tone"
    assert abs(len(y) - 8000) <= 1 and abs(row["duration_s"] - 0.5) <= 1 / 16000
    assert row["width"] is None and row["height"] is None
    spectrum = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    assert abs(np.argmax(spectrum) * sr / len(y) - 1000.0) <= sr / len(y)
    meta = json.loads(row["meta"])
    assert meta["orig_sample_rate"] == 44100 and meta["channels"] == 2


# ---- tables --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_caption_table_joins_folder_items_and_keeps_extra_columns(tmp_path, fmt):
    images = tmp_path / "ds" / "images"
    save_image(images / "circle" / "a.png")
    save_image(images / "square" / "b.png")
    save_image(images / "square" / "c.png")  # no row: an item without text
    save_image(tmp_path / "ds" / "extra" / "d.png")  # a row outside the folder: its own item, no label
    rows = [
        {"image": "images/circle/a.png", "caption": "a red circle", "shape": "circle", "colour": "red",
         "split": "test"},
        {"image": str(images / "square" / "b.png"), "caption": "a blue square", "shape": "square", "colour": "blue",
         "split": ""},
        {"image": "extra/d.png", "caption": "something else", "shape": "blob", "colour": "green", "split": "val"},
    ]
    table = tmp_path / "ds" / f"captions.{fmt}"
    pq.write_table(pa.Table.from_pylist(rows), table) if fmt == "parquet" else table.write_text(
        "image,caption,shape,colour,split\n" + "".join(",".join(r.values()) + "\n" for r in rows))
    res = ingest(Sources(images=images, captions=table), CFG, tmp_path / "out")
    items = {r["source"].rsplit("/", 1)[-1]: r for r in read_items(res)}
    assert res.n_items["image"] == 4 and res.n_quarantined == 0
    got = {name: (r["text"], r["label"], r["split"]) for name, r in items.items()}
    assert got == {"a.png": ("a red circle", "circle", "test"), "b.png": ("a blue square", "square", None),
                   "c.png": (None, "square", None), "d.png": ("something else", None, "val")}
    meta = json.loads(items["a.png"]["meta"])
    assert {k: meta[k] for k in ("shape", "colour")} == {"shape": "circle", "colour": "red"} and "split" not in meta
    assert list(meta) == sorted(meta)


def test_transcripts_with_a_label_column_and_no_folder(tmp_path):
    save_audio(tmp_path / "clips" / "one.wav", sr=22050, seconds=0.3)
    save_audio(tmp_path / "clips" / "two.flac", seconds=0.2)
    save_audio(tmp_path / "clips" / "three.wav", seconds=0.2)
    (tmp_path / "t.csv").write_text(
        "path,text,label,voice,split\nclips/one.wav,one,01,en+f3,\nclips/two.flac,two,,en,Train\n"
        "clips/one.wav,again,,en,\nclips/three.wav,three,,en,dev\n"
    )
    cfg = IngestConfig(transcript_path_col="path", transcript_col="text")
    res = ingest(Sources(transcripts=tmp_path / "t.csv"), cfg, tmp_path / "out")
    items = sorted(read_items(res), key=lambda r: r["text"])
    assert [(r["text"], r["label"], r["split"]) for r in items] == [("one", "01", None), ("two", None, "train")]
    assert [q["reason"] for q in read_quarantine(res)] == [
        f"duplicate of an earlier row: transcript row 1 names the same file {tmp_path / 'clips' / 'one.wav'}; "
        "keep one per file",
        "invalid split: transcript row 4 has split 'dev'; use train, val, test, test_<name> or empty",
    ]
    assert json.loads(items[0]["meta"])["voice"] == "en+f3" and abs(items[0]["duration_s"] - 0.3) <= 1 / 16000


# ---- shards --------------------------------------------------------------------------------------------------------


def test_img2dataset_shards_ingest_with_captions_and_meta(tmp_path):
    (tmp_path / "laion").mkdir()
    write_tar(tmp_path / "laion" / "00000.tar", [img2dataset_sample(i) for i in range(3)])
    write_tar(tmp_path / "laion" / "00001.tar", [img2dataset_sample(i, "PNG", "png") for i in range(10, 12)]
              + [("000000099", {"txt": b"orphan caption"})])
    res = ingest(Sources(shards=(str(tmp_path / "laion" / "0000{0..1}.tar"),)), CFG, tmp_path / "out")
    items = read_items(res)
    assert res.n_items == {"image": 5, "audio": 0}
    assert [r["key"] for r in items] == sorted(r["key"] for r in items)
    by_text = {r["text"]: r for r in items}
    assert set(by_text) == {"photo 0", "photo 1", "photo 2", "photo 10", "photo 11"}
    row = by_text["photo 11"]
    assert row["source"] == f"{tmp_path / 'laion' / '00001.tar'}#000000011" and row["payload_ext"] == "png"
    assert (row["width"], row["height"]) == (19, 6) and json.loads(row["meta"])["url"] == "http://example.com/11.jpg"
    assert by_text["photo 0"]["payload_ext"] == "jpg" and by_text["photo 0"]["label"] is None
    (q,) = read_quarantine(res)
    assert q["source"].endswith("00001.tar#000000099")
    assert q["reason"] == "no image or audio member: the sample has only txt"


# ---- one-line errors -----------------------------------------------------------------------------------------------


def test_one_line_errors(tmp_path):
    def error(sources, cfg=CFG) -> str:
        with pytest.raises(IngestError) as e:
            ingest(sources, cfg, tmp_path / "out")
        msg = str(e.value)
        assert "\n" not in msg and not (tmp_path / "out").exists()
        return msg

    msg = error(Sources(images=tmp_path / "x" / "y"))
    assert f"images folder {tmp_path / 'x' / 'y'} does not exist" in msg and "--images DIR" in msg
    assert "--shards" in error(Sources(shards=(str(tmp_path / "nope-*.tar"),)))
    with pytest.raises(IngestError, match="no sources given"):
        Sources()
    with pytest.raises(IngestError, match="max_duration_s=1"):
        IngestConfig(min_duration_s=2.0, max_duration_s=1)

    save_image(tmp_path / "i" / "c" / "a.png")
    (tmp_path / "t.csv").write_text("file,text,colour\ni/c/a.png,hello,red\n")
    msg = error(Sources(captions=tmp_path / "t.csv"))
    assert "'image' and 'caption'" in msg and "file, text, colour" in msg
    assert "--caption-path-col" in msg and "--caption-col" in msg
    (tmp_path / "t.xlsx").write_bytes(b"PK")
    assert "unsupported format '.xlsx'" in error(Sources(captions=tmp_path / "t.xlsx"))
    with pytest.raises(IngestError, match="--caption-col"):
        digest_sources(Sources(captions=tmp_path / "t.csv"), IngestConfig(caption_path_col="file"))

    (tmp_path / "bad" / "c").mkdir(parents=True)
    (tmp_path / "bad" / "c" / "a.png").write_text("text")
    (tmp_path / "bad" / "c" / "b.png").write_bytes(b"")
    msg = error(Sources(images=tmp_path / "bad"))
    assert msg.startswith("no valid items: 0 of 2 files decoded") and "see quarantine at" in msg
    assert pq.read_table(msg.rsplit("see quarantine at ", 1)[1]).num_rows == 2
