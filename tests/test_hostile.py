"""Hostile input: a generated corpus of bad inputs (empty, truncated, mislabelled, bombs, special files, traversal
names, rows and symlinks outside the allowed roots, non-adjacent tar members, extreme sizes), each case next to good
items. Every case runs under a timeout and checks: no hang, no crash, every bad item quarantined (or counted as
skipped) with its reason, every good item landed, and nothing outside the allowed roots opened (an audit hook
records every open and folder listing; a FIFO outside the roots would also hang whoever opened it)."""

from __future__ import annotations

import json
import os
import socket
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq
import pytest

from tasks.data.ingest import IngestConfig, Sources, digest_sources, ingest
from tests.tiny_inputs import (fifo, image_bytes, link_member, noise_png, png_bomb, save_audio, save_image, symlink,
                               tar_of)

CFG = IngestConfig()
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # bombs are the point

# ---- what was opened ---------------------------------------------------------------------------------------------
_OPENED: list | None = None  # paths opened or listed while a case runs (None: not recording)


def _audit(event: str, args: tuple) -> None:
    if _OPENED is not None and event in ("open", "os.scandir", "os.listdir") and isinstance(args[0], (str, bytes,
                                                                                                       Path)):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # permanent for the process, but a no-op unless a case is recording


def run_recorded(fn, *args):
    """fn(*args) and the absolute paths it opened or listed (from any thread)."""
    global _OPENED
    _OPENED = []
    try:
        result = fn(*args)
        return result, [os.path.abspath(p) for p in _OPENED]
    finally:
        _OPENED = None


# ---- corpus builders ---------------------------------------------------------------------------------------------


@dataclass
class World:
    """tmp/in: the allowed root (images/, audio/, tables, shards); tmp/outside: must never be opened (a secret
    image and a FIFO that would hang whoever opens it)."""

    tmp: Path
    images: Path = field(init=False)
    inside: Path = field(init=False)
    outside: Path = field(init=False)

    def __post_init__(self):
        self.inside, self.outside = self.tmp / "in", self.tmp / "outside"
        self.images = self.inside / "images"
        save_image(self.images / "c" / "good.png")
        save_image(self.outside / "secret.png", colour=(1, 2, 3))
        fifo(self.outside / "trap.png")
        (self.outside / "sub").mkdir()
        save_image(self.outside / "sub" / "deep.png")


@dataclass
class Case:
    name: str
    build: Callable[[World], Sources]
    refused: dict[str, str]  # quarantine source (relative to tmp/in, or "#key" suffix) -> reason kind
    landed: set[str] = field(default_factory=lambda: {"images/c/good.png"})  # item sources, relative to tmp/in
    skipped: dict[str, int] = field(default_factory=dict)  # summary "skipped" entries that must be there
    cfg: IngestConfig = CFG
    may_open_outside: bool = False  # the case allows a root outside tmp/in


def _images(w: World, **kw) -> Sources:
    return Sources(images=w.images, **kw)


def _special_files(w: World) -> Sources:
    fifo(w.images / "c" / "x.png")  # a FIFO named like an image
    symlink(w.images / "c" / "zero.png", "/dev/zero")  # a device, outside the roots
    cwd = os.getcwd()
    os.chdir(w.images / "c")  # a relative name: AF_UNIX paths are limited to ~100 bytes
    try:
        with socket.socket(socket.AF_UNIX) as srv:
            srv.bind("sock.png")
    finally:
        os.chdir(cwd)
    fifo(w.images / "c" / "pipe.txt")  # not a candidate: passed over by its extension, never opened
    return _images(w)


def _devices_allowed(w: World) -> Sources:
    symlink(w.images / "c" / "zero.png", "/dev/zero")
    symlink(w.images / "c" / "null.png", "/dev/null")
    return _images(w, allow_roots=("/dev",))


def _links(w: World) -> Sources:
    symlink(w.images / "c" / "self.png", "self.png")  # a loop
    symlink(w.images / "c" / "a.png", "b.png")
    symlink(w.images / "c" / "b.png", "a.png")
    symlink(w.images / "c" / "back", "..")  # a folder loop
    symlink(w.images / "c" / "gone.png", "nowhere.png")  # broken
    symlink(w.images / "c" / "noext", "noext")  # a loop without an image extension: still reported
    symlink(w.images / "c" / "secret.png", w.outside / "secret.png")  # a file outside the roots
    symlink(w.images / "c" / "trap.png", w.outside / "trap.png")  # a FIFO outside the roots
    symlink(w.images / "ext", w.outside / "sub")  # a folder outside the roots
    symlink(w.images / "alias", "c")  # the same folder twice: searched once
    save_image(w.images / "d" / "ok.png")
    symlink(w.images / "d" / "inside.png", "ok.png")  # a link inside the roots: an item of its own
    return _images(w)


def _links_allowed(w: World) -> Sources:
    symlink(w.images / "c" / "secret.png", w.outside / "secret.png")
    symlink(w.images / "ext", w.outside / "sub")
    return _images(w, allow_roots=(str(w.outside),))


def _hidden(w: World) -> Sources:
    save_image(w.images / "c" / ".hidden.png")
    save_image(w.images / ".git" / "x.png")
    save_image(w.images / "c" / "._good.png")  # macOS AppleDouble litter
    (w.images / "c" / "notes.txt").write_text("not an image")
    return _images(w)


def _bad_images(w: World) -> Sources:
    (w.images / "c" / "empty.png").write_bytes(b"")
    cut = noise_png(w.images / "c" / "cut.png")
    cut.write_bytes(cut.read_bytes()[:300])
    (w.images / "c" / "text.jpg").write_text("not a jpeg")
    save_audio(w.images / "c" / "sound.png")  # a WAV named .png
    (w.images / "c" / "real.jpg").write_bytes(image_bytes(fmt="PNG"))  # a PNG named .jpg: content decides, lands
    (w.images / "c" / "bomb.png").write_bytes(png_bomb(13_000, 13_000))  # 169 Mpx declared
    (w.images / "c" / "huge.png").write_bytes(png_bomb(100_000, 100_000))  # past Pillow's own limit too
    save_image(w.images / "c" / "dot.png", size=(1, 1))  # extreme but valid sizes land
    save_image(w.images / "c" / "thin.png", size=(20_000, 1))
    save_image(w.images / "c" / ("n" * 200 + ".png"))
    return _images(w)


def _bad_audio(w: World) -> Sources:
    audio = w.inside / "audio"
    save_audio(audio / "x" / "ok.wav")
    (audio / "x" / "empty.wav").write_bytes(b"")
    save_audio(audio / "x" / "long.wav", sr=8000, seconds=31.0)
    (audio / "x" / "pic.wav").write_bytes(image_bytes(fmt="PNG"))  # an image named .wav
    t = save_audio(audio / "x" / "trunc.flac", seconds=1.0, fmt="FLAC")
    t.write_bytes(t.read_bytes()[:200])
    return Sources(images=w.images, audio=audio)


def _big_file(w: World) -> Sources:
    noise_png(w.images / "c" / "big.png", size=(64, 64))  # > 4 KB of noise
    return _images(w)


def _table(w: World) -> Sources:
    fifo(w.inside / "tables" / "fifo.png")
    (w.inside / "tables" / "folder.png").mkdir()
    save_image(w.inside / "tables" / "own.png")
    save_image(w.inside / "tables" / "blank.png")
    rows = ["../../../../../../../../etc/passwd", "../../outside/secret.png", str(w.outside / "trap.png"),
            "~/x.png", "s3://bucket/x.png", "pipe:cat /etc/passwd", "file:///etc/passwd", "fifo.png", "folder.png",
            "../images/c/good.png", "own.png"]
    text = "image,caption\n" + "".join(f"{r},caption {i}\n" for i, r in enumerate(rows, 1))
    text += "blank.png,\n" + "only-one-field.png\n"  # an empty caption; a malformed row
    (w.inside / "tables" / "captions.csv").write_text(text)
    return _images(w, captions=w.inside / "tables" / "captions.csv")


def _tar_names(w: World) -> Sources:
    good = image_bytes(fmt="PNG")
    tar_of(w.inside / "shards" / "a.tar", [
        ("../../evil.png", good), ("../../evil.txt", b"evil"), ("/abs/evil2.png", good),
        ("ok/../../x.png", good), ("C:/win.png", good), ("keep.png", good), ("keep.txt", b"kept"),
        link_member("link.png", "/etc/passwd"), link_member("hard.png", "keep.png", tarfile.LNKTYPE),
        link_member("dev.png", "", tarfile.CHRTYPE), ("dup.png", good), ("dup.png", good),
        (".hidden.png", good), ("README", b"hi"), ("big.png", b"\0" * 5000),
    ])
    return _images(w, shards=(str(w.inside / "shards" / "*.tar"),))


def _tar_split(w: World) -> Sources:
    png = image_bytes(fmt="PNG")
    tar_of(w.inside / "shards" / "s.tar", [
        ("a.png", png), ("b.png", png), ("b.txt", b"bee"), ("a.txt", b"ay"),  # a's members are not adjacent
        ("c.txt", b"see"), ("d.png", png), ("c.png", png),  # c: caption first, image after another sample
        ("e.png", png), ("e.txt", b"ee"),
    ])
    return _images(w, shards=(str(w.inside / "shards" / "s.tar"),))


def _bad_shards(w: World) -> Sources:
    d = w.inside / "shards"
    png = image_bytes(fmt="PNG")
    tar_of(d / "ok.tar", [("k.png", png), ("k.txt", b"k")])
    (d / "empty.tar").write_bytes(b"")
    (d / "png.tar").write_bytes(png)  # mislabelled
    whole = tar_of(d / "cut.tar", [("m.png", png), ("m.txt", b"m"), ("n.png", png)]).read_bytes()
    (d / "cut.tar").write_bytes(whole[:2048 + 512 + 30])  # inside n.png's data
    tar_of(d / "bomb.tar.gz", [("z.png", b"\0" * (3 << 20))], gz=True)  # 3 MB of zeros in a few KB
    fifo(d / "fifo.tar")
    symlink(d / "dev.tar", "/dev/zero")
    return _images(w, shards=(str(d / "*.tar"), str(d / "*.tar.gz"), f"pipe:cat {d / 'ok.tar'}"))


def _url_shards(w: World) -> Sources:
    """URLs are read when the user names them (here an fsspec memory:// glob), never from a table."""
    from tasks.infra import storage

    base = f"memory://tessera-hostile-{w.tmp.name}"
    shard = tar_of(w.tmp / "u.tar", [("u.png", image_bytes(fmt="PNG")), ("u.txt", b"you")])
    storage.write_bytes(f"{base}/s.tar", shard.read_bytes())
    (w.inside / "caps.csv").write_text(f"image,caption\n{base}/s.tar,a shard named in a table\n")
    return _images(w, shards=(f"{base}/*.tar",), captions=w.inside / "caps.csv")


CASES = [
    Case("special-files", _special_files,
         {"images/c/x.png": "not a regular file", "images/c/sock.png": "not a regular file",
          "images/c/zero.png": "outside the allowed roots"},
         skipped={"not an image file (extension)": 1}),
    Case("devices-in-an-allowed-root", _devices_allowed,
         {"images/c/zero.png": "not a regular file", "images/c/null.png": "not a regular file"},
         may_open_outside=True),
    Case("symlinks", _links,
         {"images/c/self.png": "symlink loop", "images/c/a.png": "symlink loop", "images/c/b.png": "symlink loop",
          "images/c/back": "symlink loop", "images/c/gone.png": "broken symlink", "images/c/noext": "symlink loop",
          "images/c/secret.png": "outside the allowed roots", "images/c/trap.png": "outside the allowed roots",
          "images/ext": "outside the allowed roots"},
         landed={"images/c/good.png", "images/d/ok.png", "images/d/inside.png"},
         skipped={"folder reached again through a symlink (searched once)": 1}),
    Case("symlinks-with-allow-root", _links_allowed, {},
         landed={"images/c/good.png", "images/c/secret.png", "images/ext/deep.png"}, may_open_outside=True),
    Case("hidden", _hidden, {"images/c/.hidden.png": "hidden file", "images/c/._good.png": "hidden file"},
         skipped={"hidden folder (not searched)": 1, "not an image file (extension)": 1}),
    Case("bad-images", _bad_images,
         {"images/c/empty.png": "file is empty (0 bytes)", "images/c/cut.png": "cannot decode image",
          "images/c/text.jpg": "cannot decode image", "images/c/sound.png": "cannot decode image",
          "images/c/bomb.png": "image too large", "images/c/huge.png": "image too large"},
         landed={"images/c/good.png", "images/c/real.jpg", "images/c/dot.png", "images/c/thin.png",
                 f"images/c/{'n' * 200}.png"}),
    Case("bad-audio", _bad_audio,
         {"audio/x/empty.wav": "file is empty (0 bytes)", "audio/x/long.wav": "audio too long",
          "audio/x/pic.wav": "cannot decode audio", "audio/x/trunc.flac": "cannot decode audio"},
         landed={"images/c/good.png", "audio/x/ok.wav"}),
    Case("file-size-limit", _big_file, {"images/c/big.png": "file too large"},
         cfg=IngestConfig(max_file_bytes=4096)),
    Case("table-rows", _table,
         {f"tables/captions.csv#row{n}": kind for n, kind in enumerate(
             ["outside the allowed roots"] * 4 + ["URL in a table"] * 3 + ["not a regular file"] * 2, 1)}
         | {"tables/captions.csv#malformed1": "malformed caption row"},
         landed={"images/c/good.png", "tables/own.png", "tables/blank.png"},
         skipped={"empty caption (the file lands without one)": 1}),
    Case("tar-member-names", _tar_names,
         {"#../../evil": "unsafe tar member name", "#/abs/evil2": "unsafe tar member name",
          "#ok/../../x": "unsafe tar member name", "#C:/win": "unsafe tar member name",
          "#link": "tar member is not a regular file", "#hard": "tar member is not a regular file",
          "#dev": "tar member is not a regular file", "#dup": "duplicate member", "#big": "file too large"},
         landed={"images/c/good.png", "shards/a.tar#keep"},
         skipped={"tar member not named key.ext (hidden or without an extension)": 2},
         cfg=IngestConfig(max_file_bytes=4096)),
    Case("tar-split-samples", _tar_split, {"#a": "split sample", "#c": "split sample"},
         landed={"images/c/good.png", "shards/s.tar#b", "shards/s.tar#d", "shards/s.tar#e"}),
    Case("bad-shards", _bad_shards,
         {"shards/empty.tar": "tar shard is corrupt or truncated", "shards/png.tar": "tar shard is corrupt",
          "shards/cut.tar": "tar shard is", "shards/cut.tar#n": "sample cut off by the shard error",
          "shards/bomb.tar.gz#z": "file too large", "shards/fifo.tar": "not a regular file",
          "shards/dev.tar": "not a regular file"},
         landed={"images/c/good.png", "shards/ok.tar#k", "shards/cut.tar#m", "#k"},
         cfg=IngestConfig(max_file_bytes=1 << 20)),
    Case("url-shards", _url_shards, {"caps.csv#row1": "URL in a table"}, landed={"images/c/good.png", "#u"}),
]


def _rel(source: str, world: World) -> str:
    return source.removeprefix(f"{world.inside}/")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_case(tmp_path, case):
    world = World(tmp_path)
    sources = case.build(world)
    out = tmp_path / "out"
    (res, opened) = run_recorded(ingest, sources, case.cfg, out)
    (_, opened_digest) = run_recorded(digest_sources, sources, case.cfg)
    (_, opened_key) = run_recorded(sources.cache_key)

    quarantine = pq.read_table(res.quarantine_path).to_pylist()
    got = {(_rel(q["source"], world), q["reason"]) for q in quarantine}
    for source, kind in case.refused.items():
        hits = [r for s, r in got if (s == source or (source.startswith("#") and s.endswith(source)))]
        assert any(r.startswith(kind) for r in hits), (source, kind, sorted(got))
    assert all(q["reason"] and "\n" not in q["reason"] for q in quarantine)
    items = pq.read_table(res.items_path, columns=["source", "text"]).to_pylist()
    landed = {_rel(r["source"], world) for r in items}
    assert all(any(s == want or (want.startswith("#") and s.endswith(want)) for s in landed)
               for want in case.landed), (case.landed, landed)
    assert len(landed) == len(case.landed), landed  # nothing else landed (in particular nothing from outside)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_quarantined"] == len(quarantine) and sum(summary["reasons"].values()) == len(quarantine)
    for reason, n in case.skipped.items():
        assert summary["skipped"].get(reason) == n, summary["skipped"]
    if not case.may_open_outside:
        for paths in (opened, opened_digest, opened_key):
            assert not [p for p in paths if p.startswith(f"{world.outside}")], paths
    for paths in (opened, opened_digest, opened_key):  # special files are never opened, wherever they are
        # (/dev/null: a pipe: shard's command gets it as its standard input)
        assert not [p for p in paths if (p.startswith("/dev/") and p != "/dev/null")
                    or p.endswith(("x.png", "sock.png", "fifo.tar"))]


@pytest.mark.timeout(60)
def test_split_sample_never_lands_an_image_without_its_caption(tmp_path):
    """Issue 14 item 8: in a tar whose members of one sample are not adjacent, the image landed without its
    caption. Now the sample is refused whole; the samples around it land with their captions."""
    world = World(tmp_path)
    res = ingest(_tar_split(world), CFG, tmp_path / "out")
    texts = {r["source"].rsplit("#", 1)[-1]: r["text"] for r in pq.read_table(res.items_path).to_pylist()}
    assert texts == {f"{world.images}/c/good.png": None, "b": "bee", "d": None, "e": "ee"}


@pytest.mark.timeout(60)
def test_tar_traversal_names_never_land(tmp_path):
    """Issue 14 item 3: members named ../../evil.png or /abs/evil2.png landed, their sources keeping the names."""
    world = World(tmp_path)
    res = ingest(_tar_names(world), IngestConfig(max_file_bytes=4096), tmp_path / "out")
    sources = [r["source"] for r in pq.read_table(res.items_path).to_pylist()]
    assert not [s for s in sources if ".." in s or "#/" in s or "evil" in s]


@pytest.mark.timeout(3, method="signal")  # the hang is in open(2) of a FIFO: SIGALRM interrupts it
def test_the_pipeline_cache_key_opens_no_special_file(tmp_path):
    """Issue 14 item 1 through the pipeline: the ingest stage's cache key is computed before ingest runs."""
    from tasks.infra.cache import _key_of

    world = World(tmp_path)
    symlink(world.images / "a" / "trap.png", world.outside / "trap.png")  # sorted first: the hash would open it
    _, opened = run_recorded(_key_of, Sources(images=world.images))
    assert not [p for p in opened if p.startswith(f"{world.outside}")]


@pytest.mark.timeout(180)
@pytest.mark.usefixtures("prefect_harness")
def test_rewritten_or_added_shards_rerun_the_ingest_stage(tmp_path):
    """Issue 14 item 5 through the pipeline: a shard rewritten in place, or a new file matching the same glob,
    returned the old ingest as Cached (the key held the glob's text)."""
    from prefect import flow

    from tasks import stages
    from tests.tiny_inputs import img2dataset_sample, write_tar

    d = tmp_path / "shards"
    d.mkdir()
    write_tar(d / "a.tar", [img2dataset_sample(0)])
    sources = Sources(shards=(str(d / "*.tar"),))

    @flow(name="ingest-shards")
    def ingest_state() -> str:
        return stages.ingest(sources, CFG, tmp_path / "root", return_state=True).name

    assert [ingest_state(), ingest_state()] == ["Completed", "Cached"]
    st = (d / "a.tar").stat()
    (d / "a.tar").write_bytes((d / "a.tar").read_bytes().replace(b"photo 0", b"photo 9"))  # in place, same size
    os.utime(d / "a.tar", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert ingest_state() == "Completed"
    write_tar(d / "b.tar", [img2dataset_sample(1)])  # a new file matching the glob
    assert [ingest_state(), ingest_state()] == ["Completed", "Cached"]
