"""Which models the data can feed: the prepared data's facts (stats.json), the table's `needs`, and the pipeline's plan."""

from __future__ import annotations

import json

import pytest

from flows.params import PipelineParams, TrainParams
from flows.pipeline import codebook_config, plan_models
from tasks.train import table


def facts(train_items=100, labelled=100, with_text=100, distinct_texts=100, top_text_share=0.01) -> dict:
    return dict(train_items=train_items, labelled=labelled, with_text=with_text, distinct_texts=distinct_texts,
                top_text_share=top_text_share)


def stats(image: dict | None = None, audio: dict | None = None, classes=("cat", "dog")) -> dict:
    out = {}
    for name, f in (("image", image), ("audio", audio)):
        if f is not None:
            out[name] = {"classes": list(classes), "facts": f}
    return out


def test_the_built_in_world_records_its_facts(builtin_world):
    s = json.loads((builtin_world["prep"] / "stats.json").read_text())
    image, audio = s["image"]["facts"], s["audio"]["facts"]
    assert image["train_items"] == s["counts"]["image"]["train"] == image["labelled"] == image["with_text"]
    assert 1 < image["distinct_texts"] <= image["train_items"] and 0 < image["top_text_share"] < 0.5
    assert audio["train_items"] == s["counts"]["audio"]["train"]
    assert table.plan(None, s, batch_size=4)[0] == list(table.MODELS)  # the built-in set feeds every model


def test_image_folders_alone_feed_only_the_image_classifier(capsys):
    only_images = stats(image=facts(with_text=0, distinct_texts=0, top_text_share=0.0))
    models = plan_models(PipelineParams(), only_images)
    assert models == ["vit", "imagegpt"]  # ImageGPT models pixels: no labels or text needed
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "skipping ast: the data has no audio items in its train split",
        "skipping clip: it needs captions, and no image item in the train split has one",
        "skipping asr: the data has no audio items in its train split",
        "skipping t2i: it needs captions, and no image item in the train split has one",
        "skipping tts: the data has no audio items in its train split",
    ]


def test_audio_without_transcripts_feeds_the_audio_classifier(capsys):
    models = plan_models(PipelineParams(), stats(audio=facts(with_text=0, distinct_texts=0)))
    assert models == ["ast"]
    assert "skipping asr: it needs transcripts, and no audio item in the train split has one" in capsys.readouterr().out


def test_one_label_is_no_classification():
    assert table.feeds("vit", stats(image=facts(), classes=["cat"])) == (
        "it classifies, and the image items have fewer than two labels (class folders or a label column)")


@pytest.mark.parametrize("distinct, top, ok", [(128, 0.01, True), (127, 0.01, False), (1000, 0.51, False)])
def test_clip_needs_captions_that_tell_a_batch_apart(distinct, top, ok):
    why = table.feeds("clip", stats(image=facts(distinct_texts=distinct, top_text_share=top)), batch_size=64)
    assert (why is None) == ok
    if not ok:
        assert why.startswith("its captions cannot tell a batch apart") and "2 x batch size = 128" in why


def test_identical_captions_refuse_clip_when_it_is_named():
    same_caption = stats(image=facts(distinct_texts=1, top_text_share=1.0))
    with pytest.raises(ValueError, match=r"^cannot train clip: its captions cannot tell a batch apart: 1 distinct "
                                         r"captions .* the most common on 100% .*leave it out of --models"):
        plan_models(PipelineParams(train=TrainParams(models=["vit", "clip"])), same_caption)


def test_data_that_feeds_nothing_is_one_line():
    with pytest.raises(ValueError, match="the data can feed none of the models"):
        plan_models(PipelineParams(), {})


def test_only_the_codebooks_the_models_read_are_fitted():
    assert codebook_config(PipelineParams(), ["vit", "ast"]).kinds == ()
    assert codebook_config(PipelineParams(), ["vit", "imagegpt", "tts"]).kinds == ("pixels",)
    assert codebook_config(PipelineParams(), list(table.MODELS)).kinds == ("pixels", "image")
