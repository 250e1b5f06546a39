"""Train-time augmentation (tasks/train/augment/: images, mixup and the settings; log-mels in test_augment_audio.py)
and the convolutional stem it pairs with (models/embeddings.py)."""

import pytest
import torch

from models.embeddings import ConvStem, PatchEmbed
from models.vit import ViT, ViTConfig
from tasks.train import augment
from tasks.train.table import MODELS


def test_shift_flip_moves_each_image_within_bounds():
    torch.manual_seed(0)
    x = torch.zeros(16, 3, 16, 16)
    x[:, :, 8, 8] = 1.0  # one bright pixel in the middle of a black image
    y = augment.shift_flip(x, max_shift=3, flip=False)
    assert y.shape == x.shape
    for img in y:
        (r, c), = img[0].nonzero().tolist()
        assert abs(r - 8) <= 3 and abs(c - 8) <= 3
        assert torch.equal(img[0], img[1])  # the same move for every channel
    assert len({tuple(img[0].nonzero()[0].tolist()) for img in y}) > 1  # not the same move for every image


def test_shift_flip_replicates_the_border_and_flips():
    torch.manual_seed(0)
    x = torch.full((8, 1, 8, 8), 0.5)
    assert torch.equal(augment.shift_flip(x, max_shift=2, flip=True), x)  # a plain image stays plain
    ramp = torch.arange(8.0).expand(64, 1, 8, 8)
    y = augment.shift_flip(ramp, max_shift=0, flip=True)
    flipped = (y == ramp.flip(-1)).flatten(1).all(1)
    kept = (y == ramp).flatten(1).all(1)
    assert (flipped | kept).all() and 10 < int(flipped.sum()) < 54
    assert torch.equal(augment.shift_flip(ramp, max_shift=0, flip=False), ramp)


def test_shift_flip_is_reproducible_from_the_global_seed():
    x = torch.randn(4, 3, 8, 8)
    torch.manual_seed(1)
    a = augment.shift_flip(x)
    torch.manual_seed(1)
    assert torch.equal(a, augment.shift_flip(x))


def test_mixup_blends_inputs_and_targets_alike():
    torch.manual_seed(0)
    x = torch.eye(4)[:, :, None].expand(4, 4, 3).clone()  # sample i is one-hot at i
    labels = torch.arange(4)
    y, target = augment.mixup(x, labels, n_classes=4, alpha=0.4)
    assert torch.allclose(target.sum(1), torch.ones(4))
    assert torch.allclose(y[:, :, 0], target)  # the inputs were one-hot in their labels, so they mix the same way
    same, onehot = augment.mixup(x, labels, n_classes=4, alpha=0.0)
    assert torch.equal(same, x) and torch.equal(onehot, torch.eye(4))


def test_only_imagegpt_of_the_generative_models_is_augmented():
    """The classifiers and the speech recogniser (its target is text) are; of the models that generate their inputs'
    kind only ImageGPT, whose hue swap gives it every colour on every shape (its captions-free targets stay images of
    the data's palette); text-to-image's and text-to-speech's targets are what their text says."""
    assert {n for n, s in MODELS.items() if s.augment is not None} == {"vit", "ast", "asr", "imagegpt"}
    for n in ("t2i", "tts"):
        assert MODELS[n].augment is None


def _thing(colour, background, rows=slice(2, 5)):
    """(3, 8, 8) 0..255: a square of `colour` on `background`, its top row half blended into the background."""
    x = torch.tensor(background, dtype=torch.float32)[:, None, None].expand(3, 8, 8).clone()
    c = torch.tensor(colour, dtype=torch.float32)[:, None]
    x[:, rows, 2:5] = c[:, :, None]
    x[:, rows.start - 1, 2:5] = 0.5 * c + 0.5 * x[:, 0, :1]
    return x


def test_hue_swap_recolours_the_thing_in_a_partners_colour_and_keeps_its_background():
    from models import rng

    red, blue, green = (220, 30, 30), (30, 80, 230), (30, 160, 50)
    x = torch.stack([_thing(red, (255, 255, 255)), _thing(blue, (128, 128, 128)), _thing(green, (0, 0, 0)),
                     torch.full((3, 8, 8), 90.0)])  # the last one has no colour: never turned, never a partner
    before, coloured = augment.dominant_hue(x)
    assert coloured.tolist() == [True, True, True, False]
    assert before[:3].tolist() == pytest.approx([0.0, augment.hues(x[1:2, :, 3:4, 3:4])[0].item(), 128 / 360], abs=0.01)
    moved = 0
    for seed in range(8):
        with rng.own_draws(seed):
            y = augment.hue_swap(x, share=1.0)
        with rng.own_draws(seed):
            assert torch.equal(augment.hue_swap(x, share=1.0), y)  # the same draws, the same swap
        assert torch.equal(y[3], x[3])
        assert torch.equal(y[:, :, 6:, :], x[:, :, 6:, :])  # the background is not touched
        after, _ = augment.dominant_hue(y)
        degrees = lambda h: sorted((h * 360).round().remainder(360).tolist())  # noqa: E731 (a hue's circle)
        assert set(degrees(after[:3])) <= set(degrees(before[:3]))  # each took a partner's hue (or kept its own)
        h, chroma = augment.hues(y)
        assert torch.allclose(chroma, augment.hues(x)[1], atol=1e-3)  # value and chroma kept: blends stay blends
        assert torch.allclose(y.amax(1), x.amax(1), atol=1e-3)
        for i in range(3):  # every coloured pixel of an image, its blend included, has the image's new hue
            on = chroma[i] > 1
            assert torch.allclose(h[i][on], after[i].expand(int(on.sum())), atol=1e-3)
        if abs(after[0] - before[1]) < 1e-3:  # the red square took the blue one's hue: close to that blue
            assert (y[0, :, 3, 3] - torch.tensor(blue, dtype=torch.float32)).abs().max() < 20
            moved += 1
    assert moved > 0
    assert torch.equal(augment.hue_swap(x, share=0.0), x)


def test_imagegpt_augment_gives_back_codes_of_its_palette():
    from models import rng
    from models.vq import Codebook, image_to_tokens, tokens_to_image

    colours = [(255, 255, 255), (220, 30, 30), (30, 80, 230), (237, 142, 142), (142, 167, 242)]
    palette = Codebook.from_codes(torch.tensor(colours, dtype=torch.float32))
    data = type("Data", (), {"codebook": lambda self, kind: type("C", (), {"codebook": palette})()})()
    ctx = type("Ctx", (), {"data": data, "cfg": type("Cfg", (), {"seq_len": 64})()})()
    x = torch.stack([_thing(colours[1], colours[0]), _thing(colours[2], colours[0])])
    tokens = image_to_tokens(palette, x, patch=1)  # (2, 64)
    assert set(tokens.unique().tolist()) == {0, 1, 2, 3, 4}
    seen = set()
    for seed in range(6):
        with rng.own_draws(seed):
            out = augment.imagegpt_augment({"tokens": tokens}, ctx, {"hue_swap": 1.0})["tokens"]
        assert out.shape == tokens.shape and torch.equal(out == 0, tokens == 0)  # the background stays
        seen.add(tuple(out[:, 3 * 8 + 3].tolist()))  # the two squares' colours: kept or swapped, blends alike
        red_blend = out[0, 1 * 8 + 2].item()
        assert red_blend == {1: 3, 2: 4}[out[0, 3 * 8 + 3].item()]
    assert seen == {(1, 2), (2, 1)}
    assert torch.equal(augment.imagegpt_augment({"tokens": tokens}, ctx, {"hue_swap": 0.0})["tokens"], tokens)
    assert torch.equal(tokens_to_image(palette, tokens, 1, 8, 8)[0, :, 0, 0], torch.tensor([255.0, 255, 255]))


def test_augment_settings_are_set_per_run_and_checked_before_work():
    from tasks.train.trainer import default_train_config

    assert augment.settings(augment.ASR_AUG, {"freq_mask": 16}) == {**augment.ASR_AUG, "freq_mask": 16}
    assert augment.settings(augment.VIT_AUG, True) == augment.VIT_AUG
    assert default_train_config("vit", augment={"jitter": 0.4}).augment == {"jitter": 0.4}
    with pytest.raises(ValueError, match=r"unknown augment setting\(s\) \['fq'\].*freq_mask"):
        default_train_config("asr", augment={"fq": 16})
    with pytest.raises(ValueError, match="t2i has no train-time augmentation"):
        default_train_config("t2i", augment={"gain": 0.5})
    with pytest.raises(ValueError, match="TrainConfig.augment"):
        default_train_config("ast", augment="yes")


# ---------------------------------------------------------------------------------------------------- ViT photos


def _ctx(n_classes=4):
    """A BatchContext stand-in: the data's mean/std (3, 1, 1) and the model config's n_classes."""
    return type("Ctx", (), {"mean": torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1),
                            "std": torch.tensor([0.3, 0.25, 0.2]).view(3, 1, 1),
                            "cfg": type("Cfg", (), {"n_classes": n_classes})()})()


def _vit_aug(monkeypatch, **on):
    """VIT_AUG with everything off but `on`, whatever the defaults."""
    off = dict(max_shift=0, flip=False, jitter=0.0, trivial=False, mixup=0.0, cutmix=0.0)
    for k, v in {**off, **on}.items():
        monkeypatch.setitem(augment.VIT_AUG, k, v)


def test_colour_jitter_changes_colours_per_image_and_keeps_the_range():
    torch.manual_seed(0)
    x = torch.rand(16, 3, 8, 8)
    y = augment.colour_jitter(x, 0.4, 0.4, 0.4)
    assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1
    assert len({round(float((a - b).abs().mean()), 6) for a, b in zip(y, x)}) == 16  # every image differently
    torch.manual_seed(5)
    a = augment.colour_jitter(x)
    torch.manual_seed(5)
    assert torch.equal(a, augment.colour_jitter(x)) and not torch.equal(a, x)
    assert torch.equal(augment.colour_jitter(x, 0, 0, 0), x)
    grey = x[:, :1].expand(16, 3, 8, 8)
    assert torch.allclose(augment.colour_jitter(grey, 0, 0, 0.9), grey, atol=1e-6)  # a grey image has no saturation
    dim = x * 0.5  # brightness only: each image scaled by one factor in [0.6, 1.4]
    ratio = augment.colour_jitter(dim, 0.4, 0, 0) / dim
    assert torch.allclose(ratio, ratio[:, :1, :1, :1].expand_as(ratio), atol=1e-4)
    assert ratio.min() >= 0.6 - 1e-4 and ratio.max() <= 1.4 + 1e-4 and ratio.std() > 0.05


def test_vit_augment_jitters_pixels_not_the_normalised_values(monkeypatch):
    """The batch is normalised with the data's mean/std: jitter must act on 0..1 pixels. A jitter of almost nothing
    must then leave the batch as it was (clamping the normalised values to 0..1 would not)."""
    ctx = _ctx()
    pixels = torch.rand(8, 3, 8, 8)
    batch = {"image": (pixels - ctx.mean) / ctx.std, "label": torch.arange(8) % 4}
    _vit_aug(monkeypatch, jitter=1e-6)
    out = augment.vit_augment(batch, ctx)
    assert torch.allclose(out["image"], batch["image"], atol=1e-4) and torch.equal(out["label"], batch["label"])
    monkeypatch.setitem(augment.VIT_AUG, "jitter", 0.8)
    back = augment.vit_augment(batch, ctx)["image"] * ctx.std + ctx.mean
    assert back.min() >= -1e-5 and back.max() <= 1 + 1e-5 and not torch.allclose(back, pixels, atol=1e-2)


def test_trivial_augment_applies_one_op_per_image_reproducibly():
    torch.manual_seed(0)
    x = torch.rand(64, 3, 16, 16)
    for name, op in augment.TRIVIAL_OPS.items():
        y = op(x[:4], torch.rand(4, 1, 1, 1), torch.full((3, 1, 1), 0.5))
        assert y.shape == (4, 3, 16, 16) and y.min() >= -1e-5 and y.max() <= 1 + 1e-5, name
    for name in ("rotate", "shear_x", "shear_y", "translate_x", "translate_y", "brightness", "colour"):
        y = augment.TRIVIAL_OPS[name](x[:4], torch.zeros(4, 1, 1, 1), torch.zeros(3, 1, 1))
        assert torch.allclose(y, x[:4], atol=1e-5), name  # strength 0 leaves the image
    torch.manual_seed(1)
    a = augment.trivial_augment(x)
    torch.manual_seed(1)
    assert torch.equal(a, augment.trivial_augment(x))
    changed = (a != x).flatten(1).any(1)
    assert 0.7 < float(changed.float().mean()) < 1.0  # the identity op (1 in 13) and weak draws leave a few alone
    assert torch.equal(augment.trivial_augment(x, ops=("identity",)), x)
    shifted = augment.trivial_augment(torch.ones(8, 3, 16, 16), fill=torch.zeros(3, 1, 1), ops=("translate_x",))
    assert (shifted < 0.5).any()  # what comes in from outside is the fill


def test_cutmix_targets_are_the_pasted_area_share():
    torch.manual_seed(0)
    B, n = 8, 8
    x = torch.arange(B, dtype=torch.float32)[:, None, None, None].expand(B, 3, 16, 16).clone()  # image i is all i
    for _ in range(5):
        y, target = augment.cutmix(x, torch.arange(B), n, alpha=1.0)
        assert y.shape == x.shape and torch.allclose(target.sum(1), torch.ones(B))
        for i in range(B):
            share = torch.stack([(y[i, 0] == j).float().mean() for j in range(n)])  # area showing image j
            assert torch.allclose(share, target[i], atol=1e-6)
    same, onehot = augment.cutmix(x, torch.arange(B), n, alpha=0.0)
    assert torch.equal(same, x) and torch.equal(onehot, torch.eye(B))


def test_mix_picks_mixup_or_cutmix_and_keeps_hard_labels_when_off():
    x, labels = torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    same, hard = augment.mix(x, labels, 4)
    assert same is x and hard is labels
    torch.manual_seed(0)
    kinds = set()
    for _ in range(20):
        y, target = augment.mix(x, labels, 4, mixup_alpha=0.8, cutmix_alpha=1.0)
        assert target.shape == (6, 4) and torch.allclose(target.sum(1), torch.ones(6))
        # cutmix leaves every pixel one of the batch's, mixup blends them
        kinds.add("cutmix" if all((y[i][None] == x).any(0).all() for i in range(6)) else "mixup")
    assert kinds == {"mixup", "cutmix"}


def test_vit_augment_soft_targets_train_and_score(monkeypatch):
    from tasks.train.batches import label_accuracy

    _vit_aug(monkeypatch, cutmix=1.0, trivial=True, jitter=0.4, flip=True)
    ctx = _ctx(n_classes=4)
    batch = {"image": torch.randn(8, 3, 16, 16), "label": torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])}
    torch.manual_seed(2)
    a = augment.vit_augment(batch, ctx)
    torch.manual_seed(2)
    b = augment.vit_augment(batch, ctx)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert a["label"].shape == (8, 4) and not torch.equal(a["image"], batch["image"])
    model = ViT(ViTConfig(img_size=16, patch_size=4, dim=32, depth=1, n_heads=2, n_classes=4, label_smoothing=0.1))
    logits, loss = model(a)
    assert torch.isfinite(loss)
    correct, count = label_accuracy(logits, a)
    assert count == 8 and int(correct) == int((logits.argmax(-1) == a["label"].argmax(-1)).sum())
    assert label_accuracy(logits, batch)[1] == 8


@pytest.mark.parametrize("patch", [4, 8])
def test_conv_stem_has_the_patch_grid(patch):
    stem, flat = ConvStem(3, 64, patch), PatchEmbed(3, 64, patch)
    x = torch.randn(2, 3, 32, 32)
    assert stem(x).shape == flat(x).shape == (2, (32 // patch) ** 2, 64)
    assert stem.grid(32, 32) == flat.grid(32, 32)
    assert stem.flops(32, 32) > flat.flops(32, 32)


def test_conv_stem_rejects_a_patch_it_cannot_build():
    with pytest.raises(ValueError, match="power-of-two"):
        ConvStem(3, 64, 6)
    with pytest.raises(ValueError, match="stem"):
        ViT(ViTConfig(stem="resnet"))


def test_vit_with_conv_stem_trains():
    torch.manual_seed(0)
    model = ViT(ViTConfig(img_size=16, patch_size=4, dim=32, depth=1, n_heads=2, n_classes=2, stem="conv"))
    x = torch.randn(8, 3, 16, 16)
    batch = {"image": x, "label": (x.mean((1, 2, 3)) > 0).long()}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = model(batch)[1].item()
    for _ in range(30):
        opt.zero_grad()
        model(batch)[1].backward()
        opt.step()
    assert model(batch)[1].item() < 0.5 * first


# ---------------------------------------------------------------------------------------------------- init_from


def _vit_ckpt(tmp_path, dim=32):
    from tasks.infra.checkpoint import save_checkpoint

    torch.manual_seed(1)
    vit = ViT(ViTConfig(img_size=16, patch_size=4, dim=dim, depth=1, n_heads=2, n_classes=3, stem="conv"))
    save_checkpoint(tmp_path / "vit.pt", {"model": "vit", "state_dict": vit.state_dict()})
    return vit, tmp_path / "vit.pt"


def test_clip_stem_starts_from_the_trained_vit(tmp_path):
    from models.clip import CLIP, CLIPConfig
    from tasks.train.trainer import init_part

    vit, path = _vit_ckpt(tmp_path)
    clip = CLIP(CLIPConfig(img_size=16, patch_size=4, vision_stem="conv", vision_dim=32, vision_depth=1,
                           vision_heads=2, text_dim=32, text_depth=1, text_heads=2, context_len=16, embed_dim=16))
    before = {k: v.clone() for k, v in clip.state_dict().items()}
    n = init_part(clip, "clip", path)
    after = clip.state_dict()
    stem = [k for k in after if k.startswith("visual.patch_embed.")]
    assert n == len(stem) > 0
    for k in stem:
        assert torch.equal(after[k], vit.state_dict()["encoder." + k.removeprefix("visual.")])
    assert all(torch.equal(after[k], before[k]) for k in after if k not in stem)  # nothing else moved


def test_init_from_a_mismatched_or_wrong_checkpoint_is_a_clear_error(tmp_path):
    from models.clip import CLIP, CLIPConfig
    from tasks.train.trainer import init_part

    _, path = _vit_ckpt(tmp_path, dim=32)
    wide = CLIP(CLIPConfig(img_size=16, patch_size=4, vision_stem="conv", vision_dim=64, vision_depth=1,
                           vision_heads=2, text_dim=32, text_depth=1, text_heads=2, context_len=16, embed_dim=16))
    with pytest.raises(ValueError, match="same tower sizes"):
        init_part(wide, "clip", path)
    with pytest.raises(ValueError, match="takes no init_from"):
        init_part(ViT(ViTConfig()), "vit", path)


def test_a_run_trains_with_its_augment_settings(builtin_world, tmp_path):
    """TrainConfig.augment as a dict reaches the model's augmentation at every step, and the run records it."""
    from dataclasses import replace
    from unittest import mock

    from mlflow import MlflowClient

    from tasks.train import table
    from tasks.train.trainer import train
    from tests.helpers import TINY_TRAIN

    seen, real = [], MODELS["asr"].augment

    def watched(batch, ctx, given=None):
        seen.append(given)
        return real(batch, ctx, given)

    with mock.patch.dict(table.MODELS, {"asr": replace(MODELS["asr"], augment=watched)}):
        cfg = replace(TINY_TRAIN, max_steps=3, augment={"freq_mask": 4, "time_mask": 4})
        record = train("asr", builtin_world["prep"], tmp_path / "out", cfg, preset="tiny", experiment="aug")
    assert seen == [{"freq_mask": 4, "time_mask": 4}] * 3
    params = MlflowClient().get_run(record["run_id"]).data.params
    assert params["train.augment.freq_mask"] == "4" and params["train.augment.time_mask"] == "4"


def test_the_hue_swap_is_on_for_the_built_in_set_alone(tmp_path):
    """ImageGPT's hue swap serves the built-in set's held-out colour/shape pairs and costs likelihood on photos (table
    `builtin_train`, augment/image.py IMAGEGPT_AUG): a run on the built-in set trains with it, a run on other images
    without it, and a run's own train_overrides win over both."""
    from flows.params import DataParams, PipelineParams, TrainParams
    from flows.pipeline import train_config
    from tasks.train.augment import IMAGEGPT_AUG, settings

    def swap(**params) -> float:
        cfg = train_config("imagegpt", PipelineParams(**params))
        return 0.0 if cfg.augment is False else settings(IMAGEGPT_AUG, cfg.augment)["hue_swap"]

    photos = DataParams(images=str(tmp_path))
    assert swap() == 1.0 and swap(data=photos) == 0.0
    assert swap(data=photos, train=TrainParams(train_overrides={"imagegpt": {"augment": {"hue_swap": 0.5}}})) == 0.5
    assert swap(train=TrainParams(train_overrides={"imagegpt": {"augment": False}})) == 0.0
    assert train_config("vit", PipelineParams()).augment == train_config("vit", PipelineParams(data=photos)).augment
