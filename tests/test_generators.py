"""The generative models learn what their round trips judge: on a small built-in world (600 images, 16 px), a
generator trained for a few hundred steps beats the same generator untrained by at least MARGIN on its round trip.

    t2i       the asked colour is the dominant foreground colour (pixel statistics: no trained judge needed)
    imagegpt  unconditional samples are one coloured thing on a background (colour_purity), not scattered pixels

Each model is trained here (the session's one-step checkpoints learn nothing); its untrained twin is the same
config at step 0. The world is its own (600 images, 16 px: the session's tiny world has 22 train images), with a tiny
ViT trained as the shape judge; colour is judged from the pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.data.builtin.vocab import BUILTIN
from tasks.eval import colour, roundtrip
from tasks.eval.generate import Sampling
from tasks.infra.checkpoint import load_checkpoint, save_checkpoint
from tasks.train import table
from tasks.train.trainer import TrainConfig, train

MARGIN = 0.2
N_IMAGES = 600


def trained_and_untrained(world, tmp: Path, name: str, steps: int, **sizes) -> tuple[Path, Path]:
    """Train `name` (tiny preset and `sizes`) for `steps` on the world -> (its checkpoint, the same model at init)."""
    cfg = TrainConfig(max_steps=steps, batch_size=32, lr=3e-3, min_lr=3e-4, warmup_steps=10, eval_every=steps,
                      ckpt_every=steps, log_every=steps, precision="fp32", shuffle_buffer=64, patience=0)
    kind = table.MODELS[name].codebook
    record = train(name, world["prep"], tmp / name, cfg, model_overrides=sizes or None,
                   codebooks={kind: world["codebooks"][kind]}, preset="tiny")
    ckpt = load_checkpoint(record["last_checkpoint"])
    model = table.MODELS[name].build(table.MODELS[name].config_cls(**ckpt["config"]))  # a fresh init
    ckpt["state_dict"] = model.state_dict()
    save_checkpoint(tmp / f"{name}-untrained.pt", ckpt)
    return Path(record["last_checkpoint"]), tmp / f"{name}-untrained.pt"


def test_colour_judge_reads_the_drawn_colour():
    """Known pixels: a red square on grey, a blended edge, an image all background, a blue blob beside red dots."""
    palette, backgrounds = colour.builtin_palette(BUILTIN)
    img = torch.full((4, 3, 10, 10), 128.0)  # grey
    img[0, :, 2:6, 2:6] = torch.tensor([220.0, 30, 30])[:, None, None]  # red, 16% of the image
    img[0, :, 6, 2:6] = torch.tensor([197.0, 55, 55])[:, None]  # red 3:1 blended with grey: still red
    img[2, :, :, :5] = torch.tensor([30.0, 80, 230])[:, None, None]  # blue, half the image
    img[2, :, 0, 6:9] = torch.tensor([220.0, 30, 30])[:, None]  # three red dots
    img[3] = 255.0  # white: background only
    img[1, :, 0, 0] = torch.tensor([240.0, 210, 20])  # one yellow pixel: under the 2% floor
    assert colour.dominant_colour(img, palette, backgrounds) == ["red", None, "blue", None]
    purity = colour.colour_purity(img, palette, backgrounds)
    assert purity[0] == 1.0 and purity[2] == pytest.approx(50 / 53) and purity[3] == 0.0


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The built-in set's images only, 16 px, enough of them to learn from (the session's tiny world has 22 train
    images): generate -> ingest -> shards (held-out pairs in test) -> preprocess -> pixel and patch codebooks, and
    a tiny ViT trained as the shape judge. {"prep", "codebooks", "vit"}."""
    from models.vq import fit_kmeans
    from tasks.data.builtin.synthetic import SyntheticConfig, generate
    from tasks.data.codebook import save_codebook
    from tasks.data.ingest import IngestConfig, Sources, ingest
    from tasks.data.preprocess import PrepConfig, preprocess
    from tasks.data.shards import ShardConfig, write_shards

    tmp = tmp_path_factory.mktemp("generators")
    d = Path(generate(SyntheticConfig(n_images=N_IMAGES, n_audio=0, image_size=16), tmp / "builtin")["path"])
    items = ingest(Sources(images=d / "images", captions=d / "captions.csv"), IngestConfig(), tmp / "ingest").items_path
    write_shards(items, ShardConfig(maxcount=200, val_fraction=0.05, test_fraction=0.1), tmp / "shards")
    preprocess(tmp / "shards", PrepConfig(image_size=16, batch_size=64, n_pixels=4000, n_patches=2000), tmp / "prep")
    codebooks = {}
    for kind, k, patch in (("pixels", 16, 1), ("image", 64, 4)):
        x = torch.from_numpy(np.load(tmp / "prep" / "patches" / f"{kind}.npy").astype(np.float32))
        codebooks[kind] = str(tmp / f"{kind}.pt")
        save_codebook(fit_kmeans(x, k, iters=10)[0], codebooks[kind], {"kind": kind, "patch": patch})
    world = {"prep": tmp / "prep", "codebooks": codebooks}
    cfg = TrainConfig(max_steps=150, batch_size=32, lr=3e-3, warmup_steps=10, eval_every=150, ckpt_every=150,
                      log_every=150, precision="fp32", shuffle_buffer=64, patience=0)
    world["vit"] = Path(train("vit", world["prep"], tmp / "vit", cfg, preset="tiny")["last_checkpoint"])
    return world


def test_trained_t2i_draws_the_asked_colour(world, tmp_path):
    """The asked colour, judged from the pixels: 0.57 trained against 0.15 untrained (400 steps, dim 64). With the
    caption's byte embeddings at GPT-2's init (std 0.02, drowned by the positions) it was 0.16 against 0.16."""
    good, blank = trained_and_untrained(world, tmp_path, "t2i", steps=400, dim=64, dec_depth=2, dropout=0.1)
    how = Sampling(guidance=3.0, temperature=1.0, top_k=8)
    scores = {}
    for kind, ckpt in (("trained", good), ("untrained", blank)):
        m = roundtrip.roundtrip_t2i(ckpt, world["vit"], None, world["prep"], world["codebooks"], tmp_path / kind,
                                    BUILTIN, samples=8, how=how)["metrics"]
        scores[kind] = m["colour_recovered"]
    print("t2i colour_recovered", scores)
    assert scores["trained"] >= scores["untrained"] + MARGIN, scores


def test_trained_imagegpt_draws_one_coloured_thing(world, tmp_path):
    """Unconditional samples: a trained ImageGPT draws one coloured thing on a background (colour_purity), an
    untrained one scattered pixels of every colour. (Completions are reported, not asserted: the tiny ViT judging
    8-pixel images recovered 0.16 of the completed shapes against the untrained model's 0.25.)"""
    good, blank = trained_and_untrained(world, tmp_path, "imagegpt", steps=600, side=8, dim=64, depth=2)
    scores = {kind: roundtrip.roundtrip_imagegpt(ckpt, world["vit"], world["prep"], world["codebooks"], tmp_path / kind,
                                                 BUILTIN, samples=32, completions=32)["metrics"]["coherent_share"]
              for kind, ckpt in (("trained", good), ("untrained", blank))}
    print("imagegpt coherent_share", scores)
    assert scores["trained"] >= scores["untrained"] + MARGIN, scores


def test_completions_keep_the_given_rows_and_draw_the_rest_as_asked():
    """generate.complete_images: the given top rows come back as they were (in the palette), the rest is drawn with
    the Sampling it is given (greedy: the same whatever the generator; T 1: another draw for another generator), and
    by default with IMAGEGPT_SAMPLING, which the round trip uses for its samples and completions."""
    import inspect
    from types import SimpleNamespace

    from models.imagegpt import ImageGPT, ImageGPTConfig
    from models.vq import Codebook
    from tasks.eval import generate

    torch.manual_seed(0)
    side, rows = 4, 2
    model = ImageGPT(ImageGPTConfig(vocab_size=8, seq_len=side * side, dim=32, depth=1, n_heads=2,
                                    row_above=True)).eval()
    palette = Codebook.from_codes(torch.arange(8).float()[:, None].repeat(1, 3) * 30)  # 8 greys, 0..210
    ctx = SimpleNamespace(data=SimpleNamespace(codebook=lambda kind: SimpleNamespace(codebook=palette)))
    given = torch.randint(0, 8, (6, side * side))
    pixels = generate.imagegpt_pixels(model, ctx, given)  # (6, 3, side, side), exactly palette colours

    def draw(how, seed):
        return generate.complete_images(model, ctx, pixels, rows, how, torch.Generator().manual_seed(seed))

    greedy = Sampling(temperature=0.0)
    hot = Sampling(temperature=1.0)
    for done in (draw(greedy, 0), draw(hot, 0)):
        assert done.shape == pixels.shape and torch.equal(done[:, :, :rows], pixels[:, :, :rows])
    assert torch.equal(draw(greedy, 0), draw(greedy, 1))
    assert not torch.equal(draw(hot, 0), draw(hot, 1))
    default = inspect.signature(generate.complete_images).parameters["how"].default
    trip = inspect.signature(roundtrip.roundtrip_imagegpt).parameters
    assert default == generate.IMAGEGPT_SAMPLING == trip["complete"].default == trip["how"].default


def _tiny_t2i(n_codes: int = 8, size: int = 8, patch: int = 4):
    """An untrained tiny t2i and a stand-in batch context: the image codebook holds flat patches of grey n * 10."""
    from types import SimpleNamespace

    from models.seq2seq import Seq2Seq, text_to_image_config
    from models.vq import Codebook
    from tasks.train.batches import Codes

    torch.manual_seed(0)
    model = Seq2Seq(text_to_image_config(n_codes, (size // patch) ** 2, src_len=16, **table.TINY_S2S)).eval()
    cb = Codebook.from_codes(torch.arange(n_codes).float()[:, None].repeat(1, patch * patch * 3) * 10)
    ctx = SimpleNamespace(data=SimpleNamespace(codebook=lambda kind: Codes(cb, patch), image_size=size))
    return model, ctx


def test_rerank_keeps_the_best_scored_candidate():
    """rerank=n draws n candidates per caption and keeps the one the scorer rates highest (here: the brightest);
    rerank=1, or no scorer, draws exactly what plain sampling draws from the same seed."""
    from tasks.eval.generate import generate_images

    model, ctx = _tiny_t2i()
    captions = ["a red circle", "a blue star", "a red circle"]
    seen = []

    def brightest(caps, pixels):
        seen.append((list(caps), pixels.clone()))
        return pixels.mean(dim=(1, 2, 3))

    how = Sampling(guidance=2.0, top_k=None, rerank=4)
    best = generate_images(model, ctx, captions, how, torch.Generator().manual_seed(0), scorer=brightest)
    (caps, cands), = seen
    assert caps == [c for c in captions for _ in range(4)] and best.shape == (3, 3, 8, 8)
    want = cands.view(3, 4, 3, 8, 8)[torch.arange(3), cands.mean(dim=(1, 2, 3)).view(3, 4).argmax(-1)]
    assert torch.equal(best, want)
    plain = generate_images(model, ctx, captions, Sampling(guidance=2.0, top_k=None),
                            torch.Generator().manual_seed(0))
    unscored = generate_images(model, ctx, captions, how, torch.Generator().manual_seed(0))  # no scorer: rerank off
    one = generate_images(model, ctx, captions, Sampling(guidance=2.0, top_k=None, rerank=1),
                          torch.Generator().manual_seed(0), scorer=brightest)
    assert torch.equal(plain, unscored) and torch.equal(plain, one)
    with pytest.raises(ValueError, match="rerank"):
        Sampling(rerank=0)


def test_clip_scorer_is_the_cosine_of_image_and_caption():
    """clip_scorer: each image's cosine with its own caption's embedding, images normalised as CLIP's batches are."""
    from types import SimpleNamespace

    from models.clip import CLIP, CLIPConfig
    from tasks.eval.generate import clip_scorer
    from tasks.train.batches import TOKENIZER

    torch.manual_seed(0)
    clip = CLIP(CLIPConfig(img_size=8, **{**table.MODELS["clip"].tiny, "patch_size": 4})).eval()
    cctx = SimpleNamespace(mean=torch.full((3, 1, 1), 0.5), std=torch.full((3, 1, 1), 0.25))
    captions = ["a red circle", "a blue star", "a red circle"]
    pixels = torch.rand(3, 3, 8, 8) * 255
    got = clip_scorer(clip, cctx)(captions, pixels)
    with torch.no_grad():
        zi = clip.encode_image((pixels / 255 - 0.5) / 0.25, normalize=True)
        zt = clip.encode_text(TOKENIZER.batch_encode(captions, clip.cfg.context_len), normalize=True)
    assert got.shape == (3,) and torch.allclose(got, (zi * zt).sum(-1), atol=1e-5)


def test_tts_reference_is_another_clip_of_the_same_speaker():
    from tasks.train.batches import voice_partners

    def clip(who, draw=None, key="voice"):
        s = {"info": {"meta": {key: who} if who else {}}}
        return {**s, "draw": draw} if draw is not None else s

    # evaluation (no draw): the next clip of the speaker in batch order; a speaker's only clip and an unnamed one speak
    # in their own voice
    batch = [clip("a"), clip("b"), clip("a"), clip("c"), clip(None), clip("a")]
    assert voice_partners(batch) == [2, 1, 5, 3, 4, 0]
    # training: drawn from each clip's seed, never itself while its speaker has another clip; --name-pattern's speaker
    drawn = [clip(w, draw=d, key="speaker") for d, w in enumerate("ababab")]
    partners = voice_partners(drawn)
    assert all(p != i and p % 2 == i % 2 for i, p in enumerate(partners))
    assert partners == voice_partners(drawn)  # the same draws, the same partners
    assert len({tuple(voice_partners([clip(w, draw=d + 10 * r, key="speaker") for d, w in enumerate("ababab")]))
                for r in range(8)}) > 1  # other draws, other partners


def test_a_generator_without_its_judge_is_told_what_to_add():
    """A run that trains a generator but not its judges (`tessera train tts` alone, `--models imagegpt` on a user's
    photos) says which round trip did not run and why, in the run's summary, instead of leaving it out silently."""
    from flows.pipeline import _summary

    assert roundtrip.not_run({"speech-generator"}, builtin=True) == {
        "tts": "needs the speech-recogniser model trained in the same run"}
    assert roundtrip.not_run({"speech-generator", "speech-recogniser"}, builtin=False) == {}
    assert roundtrip.not_run({"image-sampler", "image-classifier"}, builtin=False) == {
        "image-sampler": "judges by the built-in set's shapes and colours"}
    assert roundtrip.not_run({"image-classifier", "speech-recogniser"}, builtin=True) == {}  # no generator: nothing
    trained = {m: {"steps": 1, "metrics": {}} for m in ("tts", "t2i", "vit")}
    lines = _summary(trained, {}, {"metrics": {}}, None, {}).splitlines()
    assert "- round trip tts not run: it needs the speech-recogniser model trained in the same run (add asr to " \
           "--models)" in lines
    assert "- round trip t2i not run: it needs the image-text model trained in the same run (add clip to --models)" \
           in lines
    assert not any("not run" in line for line in _summary(trained, {}, None, None, {}).splitlines())  # trips off


def test_the_run_summary_has_a_row_per_round_trip_with_its_headline_first():
    """The pipeline's summary: one table row per round trip that ran, the metrics its targets name (ROUND_TRIPS
    `headline`) first in that order, then every other metric of that trip once; trips that did not run have no row."""
    from flows.pipeline import _summary

    metrics = {"tts/wer": 0.07, "tts/cer": 0.054, "tts/direct_cer": 0.048,
               "t2i/colour_recovered": 1.0, "t2i/n": 576, "t2i/heldout_shape_recovered": 0.542,
               "t2i/seen_shape_recovered": 0.847, "t2i/shape_recovered": 0.821}
    lines = _summary({}, {}, {"path": "/r/ab", "metrics": metrics}, None, {}).splitlines()
    at = lines.index("| round trip | headline (test) | other metrics |")
    assert lines[at + 1:at + 4] == [
        "|---|---|---|",
        "| t2i | seen_shape_recovered 0.847, heldout_shape_recovered 0.542, colour_recovered 1 | n 576, "
        "shape_recovered 0.821 |",
        "| tts | cer 0.054 | direct_cer 0.048, wer 0.07 |"]
    assert not any(line.startswith("| image-sampler") for line in lines)
    assert "round trips' grids, WAVs and spectrograms: `/r/ab/summary.md`" in lines
    for trip in roundtrip.ROUND_TRIPS.values():
        assert trip.headline, "every round trip names its headline metrics"
