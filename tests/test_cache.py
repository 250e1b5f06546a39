"""The project's Prefect cache policy keys on content, config and code, not on path strings or run ids."""

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from tasks.infra import cache
from tasks.infra.cache import ContentDigest, content, root_epoch
from tasks.stages import transient_only


@dataclass(frozen=True)
class Cfg:
    lr: float = 1e-3


CTX = SimpleNamespace(task=SimpleNamespace(name="t", source_code="def t(): ..."))


def key(policy, **inputs):
    return policy.compute_key(CTX, inputs, {})


def test_path_inputs_are_keyed_by_content(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("same")
    b.write_text("same")
    p = ContentDigest()
    assert key(p, x=a) == key(p, x=b)  # same bytes, other name
    b.write_text("different")
    assert key(p, x=a) != key(p, x=b)
    d = tmp_path / "d"
    d.mkdir()
    (d / "f").write_text("1")
    k1 = key(p, x=d)
    (d / "f").write_text("2")
    assert key(p, x=d) != k1  # folders by the content of their files


def test_config_and_code_change_the_key_run_ids_do_not(tmp_path):
    p = ContentDigest()
    assert key(p, cfg=Cfg()) != key(p, cfg=Cfg(lr=2e-3))
    assert key(p, cfg=Cfg(), parent_run_id="r1") == key(p, cfg=Cfg(), parent_run_id="r2")
    assert key(content(cache), cfg=Cfg()) != key(content(Path), cfg=Cfg())  # the code the task runs is in the key


def test_wiping_the_output_root_invalidates_the_cache(tmp_path):
    p = ContentDigest()
    root = tmp_path / "out"
    k1 = key(p, root=root)
    assert key(p, root=root) == k1
    (root / cache.EPOCH).unlink()
    assert key(p, root=root) != k1
    assert len(root_epoch(root)) == 32


def test_only_transient_io_errors_are_retried():
    def state(exc):
        return SimpleNamespace(result=lambda raise_on_failure=False: exc)

    assert transient_only(None, None, state(OSError("disk hiccup")))
    assert not transient_only(None, None, state(ValueError("bad input")))
    assert not transient_only(None, None, state(FileNotFoundError("gone")))


def test_every_task_keys_its_cache_and_names_its_folder_from_one_code_list(monkeypatch):
    """Each Prefect task of tasks/stages.py is made by its Stage: the cache policy covers exactly the Stage's code,
    and a change to that code moves both the cache key and the output folder."""
    from prefect import Task

    from tasks import stages

    tasks_ = {t.name: t for t in vars(stages).values() if isinstance(t, Task)}
    assert set(tasks_) == {s.name for s in stages.STAGES}
    for s in stages.STAGES:
        assert tasks_[s.name].cache_policy.code == s.code, s.name
    train, before = stages.TRAIN, stages.TRAIN.out("/r", "vit", Cfg(), under="vit")
    ctx = SimpleNamespace(task=SimpleNamespace(name="train", source_code="def t(): ..."))
    key_before = tasks_["train"].cache_policy.compute_key(ctx, {"cfg": Cfg()}, {})
    monkeypatch.setattr(stages, "code_version", lambda *mods: "edited")
    monkeypatch.setattr(cache, "code_version", lambda *mods: "edited")
    assert train.out("/r", "vit", Cfg(), under="vit") != before
    assert tasks_["train"].cache_policy.compute_key(ctx, {"cfg": Cfg()}, {}) != key_before
    assert str(before).startswith("/r/train/vit/")
