"""Model tests: shapes, causality, KV cache, positional resizing, overfitting, checkpoints, compile, bf16, FLOPs.

Tiny configs throughout (D=32, 2 layers) so the file runs in well under a minute on two CPU cores.
"""

from __future__ import annotations

import re
import sys
from dataclasses import asdict, replace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from models import (
    AST,
    CLIP,
    EOS_ID,
    PAD_ID,
    ASTConfig,
    ByteTokenizer,
    CLIPConfig,
    ImageGPT,
    ImageGPTConfig,
    Seq2Seq,
    Seq2SeqConfig,
    ViT,
    ViTConfig,
    audio_to_text_config,
    resize_pos_embed,
    sample_logits,
    text_to_image_config,
)
from models.embeddings import RowAbove
from models.tts import TTS, TTSConfig, monotonic_alignment

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these tensors are tiny, and on a shared two-core machine OpenMP threads that spin
    while another process holds a core made these tests 30x slower (0.7 s -> 23 s for one overfit run)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


TOK = ByteTokenizer()
SMALL = dict(dim=32, n_heads=2)
S2S = dict(SMALL, enc_depth=2, dec_depth=2)
CLIP_SMALL = dict(embed_dim=16, vision_dim=32, vision_depth=2, vision_heads=2, context_len=24, text_dim=32,
                  text_depth=2, text_heads=2)

# name -> (model class, tiny config)
TINY = {
    "vit": (ViT, ViTConfig(img_size=16, patch_size=4, n_classes=5, depth=2, **SMALL)),
    "ast": (AST, ASTConfig(n_mels=32, n_frames=40, patch_size=8, fstride=6, tstride=6, n_classes=5, depth=2, **SMALL)),
    "imagegpt": (ImageGPT, ImageGPTConfig(vocab_size=16, seq_len=24, depth=2, **SMALL)),
    "imagegpt_cond": (ImageGPT, ImageGPTConfig(vocab_size=16, seq_len=24, n_classes=3, depth=2, **SMALL)),
    "imagegpt_above": (ImageGPT, ImageGPTConfig(vocab_size=16, seq_len=25, row_above=True, depth=2, **SMALL)),
    "audio_to_text": (Seq2Seq, audio_to_text_config(n_mels=16, n_frames=24, tgt_len=20, **S2S)),
    "text_to_image": (Seq2Seq, text_to_image_config(n_codes=16, n_tokens=12, src_len=24, **S2S)),
    "text_to_image_grid": (Seq2Seq, text_to_image_config(n_codes=16, n_tokens=12, src_len=24, tgt_grid=4, **S2S)),
    "text_to_image_above": (Seq2Seq, text_to_image_config(n_codes=16, n_tokens=16, src_len=24, tgt_row_above=True,
                                                          **S2S)),
    "tts": (TTS, TTSConfig(n_mels=16, n_frames=24, src_len=24, voice_dim=4, align="mas", **S2S)),
    "clip": (CLIP, CLIPConfig(img_size=16, patch_size=4, **CLIP_SMALL)),
    "clip_bidir": (CLIP, CLIPConfig(img_size=16, patch_size=4, text_causal=False, **CLIP_SMALL)),
    "clap": (CLIP, CLIPConfig(tower="audio", n_mels=32, n_frames=32, mel_patch=8, fstride=8, tstride=8, **CLIP_SMALL)),
}
CAPTIONS = ["a red circle", "a small blue square", "green", "a big yellow triangle on grey"]


def make_batch(cfg, B: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """A synthetic batch with exactly the keys the data loaders produce for this config."""
    g = torch.Generator().manual_seed(seed)
    if isinstance(cfg, ViTConfig):
        return {"image": torch.randn(B, 3, cfg.img_size, cfg.img_size, generator=g),
                "label": torch.randint(0, cfg.n_classes, (B,), generator=g)}
    if isinstance(cfg, ASTConfig):
        return {"mel": torch.randn(B, cfg.n_mels, cfg.n_frames, generator=g),
                "label": torch.randint(0, cfg.n_classes, (B,), generator=g)}
    if isinstance(cfg, ImageGPTConfig):
        batch = {"tokens": torch.randint(0, cfg.vocab_size, (B, cfg.seq_len), generator=g)}
        if cfg.n_classes:
            batch["label"] = torch.randint(0, cfg.n_classes, (B,), generator=g)
        return batch
    if isinstance(cfg, Seq2SeqConfig):
        if cfg.src_kind == "mel":
            src = torch.randn(B, cfg.n_mels, cfg.n_frames, generator=g)
        else:
            src = TOK.batch_encode((CAPTIONS * B)[:B], cfg.src_len)
        if cfg.pad_id >= 0:  # byte targets, EOS-terminated and padded
            tgt = TOK.batch_encode((CAPTIONS[::-1] * B)[:B], cfg.tgt_len)
        else:  # VQ codes: every position is a real token
            tgt = torch.randint(0, cfg.bos_id, (B, cfg.tgt_len), generator=g)
        return {"src": src, "tgt": tgt}
    if isinstance(cfg, TTSConfig):
        # sounds of 4 frames each (a byte's mean frame can fit them: models/tts.py `prior`)
        mel = torch.randn(B, cfg.n_mels, cfg.n_frames // 4, generator=g).repeat_interleave(4, -1)
        for b in range(B):  # each clip ends in silence, a frame later than the one before
            mel[b, :, cfg.n_frames // 2 + b:] = -3.0
        return {"src": TOK.batch_encode((CAPTIONS * B)[:B], cfg.src_len), "mel": mel}
    if isinstance(cfg, CLIPConfig):
        text = TOK.batch_encode((CAPTIONS * B)[:B], cfg.context_len)
        if cfg.tower == "audio":
            return {"mel": torch.randn(B, cfg.n_mels, cfg.n_frames, generator=g), "text": text}
        return {"image": torch.randn(B, 3, cfg.img_size, cfg.img_size, generator=g), "text": text}
    raise TypeError(cfg)


def build(name: str, seed: int = 0):
    cls, cfg = TINY[name]
    torch.manual_seed(seed)
    return cls(cfg).eval(), cfg


def expected_shape(cfg, batch) -> tuple[int, ...]:
    B = next(iter(batch.values())).shape[0]
    if isinstance(cfg, (ViTConfig, ASTConfig)):
        return (B, cfg.n_classes)
    if isinstance(cfg, ImageGPTConfig):
        return (B, cfg.seq_len, cfg.vocab_size)
    if isinstance(cfg, Seq2SeqConfig):
        return (B, batch["tgt"].shape[1], cfg.tgt_vocab)
    if isinstance(cfg, TTSConfig):
        return (B, cfg.n_mels, cfg.n_frames)
    return (B, B)


DEFAULTS = [(ViT, ViTConfig()), (AST, ASTConfig()), (ImageGPT, ImageGPTConfig()),
            (Seq2Seq, audio_to_text_config()), (Seq2Seq, text_to_image_config()), (TTS, TTSConfig()),
            (CLIP, CLIPConfig()), (CLIP, CLIPConfig(tower="audio"))]


@pytest.mark.parametrize("name", TINY)
def test_forward_shapes_tiny(name):
    model, cfg = build(name)
    batch = make_batch(cfg)
    out, loss = model(batch)
    assert out.shape == expected_shape(cfg, batch)
    assert torch.isfinite(out).all() and loss.ndim == 0 and torch.isfinite(loss)
    if isinstance(cfg, ViTConfig | ASTConfig):  # classifiers without targets: no loss (the generative models'
        assert model({k: v for k, v in batch.items() if k != "label"})[1] is None  # inputs are their targets)


@pytest.mark.parametrize("cls,cfg", DEFAULTS, ids=["vit", "ast", "imagegpt", "audio_to_text", "text_to_image",
                                                    "tts", "clip", "clap"])
def test_forward_shapes_default_configs(cls, cfg):
    torch.manual_seed(0)
    model = cls(cfg).eval()
    batch = make_batch(cfg, B=2)
    with torch.no_grad():
        out, loss = model(batch)
    assert out.shape == expected_shape(cfg, batch)
    assert torch.isfinite(out).all() and torch.isfinite(loss)


def test_classifier_features_and_head():
    model, cfg = build("vit")
    image = make_batch(cfg)["image"]
    feats = model.forward_features(image)
    assert feats.shape == (4, 1 + (16 // 4) ** 2, 32)
    assert model.forward_head(feats, pre_logits=True).shape == (4, 32)
    torch.testing.assert_close(model.forward_head(feats), model({"image": image})[0])
    ast, acfg = build("ast")
    grid = ((32 - 8) // 6 + 1) * ((40 - 8) // 6 + 1)  # overlapping patches: 5 x 6
    assert ast.forward_features(make_batch(acfg)["mel"]).shape == (4, 1 + grid, 32)


@pytest.mark.parametrize("name", ["imagegpt", "imagegpt_cond"])
def test_imagegpt_is_causal(name):
    model, cfg = build(name)
    batch = make_batch(cfg, B=2)
    j = 10
    changed = dict(batch, tokens=batch["tokens"].clone())
    changed["tokens"][:, j] = (changed["tokens"][:, j] + 1) % cfg.vocab_size
    a, b = model(batch)[0], model(changed)[0]
    torch.testing.assert_close(a[:, : j + 1], b[:, : j + 1])  # logits[:, i] sees tokens[:, :i] only
    assert not torch.allclose(a[:, j + 1], b[:, j + 1])  # ... and does see them


@pytest.mark.parametrize("name", ["audio_to_text", "text_to_image", "text_to_image_grid"])
def test_seq2seq_decoder_is_causal(name):
    model, cfg = build(name)
    batch = make_batch(cfg, B=2)
    j = 5
    changed = dict(batch, tgt=batch["tgt"].clone())
    changed["tgt"][:, j] = (changed["tgt"][:, j] + 1) % 256
    a, b = model(batch)[0], model(changed)[0]
    torch.testing.assert_close(a[:, : j + 1], b[:, : j + 1])
    assert not torch.allclose(a[:, j + 1], b[:, j + 1])


def test_image_targets_placed_by_row_and_column():
    """tgt_grid: a target position's embedding is its row's plus its column's, so the codes of one column share what
    places them (12 codes, 4 wide: 3 rows); no per-position table; a grid that does not divide the target is refused."""
    model, cfg = build("text_to_image_grid")
    pos = model.target_positions()  # (12, D)
    assert pos.shape == (12, cfg.dim) and "tgt_pos" not in model.state_dict()
    torch.testing.assert_close(pos[1 * 4 + 2], model.tgt_row[1] + model.tgt_col[2])
    torch.testing.assert_close(pos[0 * 4 + 2] - pos[0 * 4 + 1], pos[2 * 4 + 2] - pos[2 * 4 + 1])  # per row, the same
    flat, _ = build("text_to_image")
    assert flat.target_positions() is flat.tgt_pos and "tgt_row" not in flat.state_dict()
    with pytest.raises(ValueError, match="tgt_grid=5 must divide tgt_len=12"):
        text_to_image_config(n_codes=16, n_tokens=12, tgt_grid=5)


def test_image_codes_read_the_row_above():
    """RowAbove (ImageGPT row_above, Seq2Seq tgt_row_above): the input at position i embeds the codes above-left,
    above and above-right of code i in a raster 5 wide, the outside code past the first row and the edges; the
    code at position 7 reaches the inputs of exactly the three below it; a raster that is not square is refused."""
    stencil = RowAbove(vocab=16, dim=8, width=5, length=25)
    assert stencil.index[7].tolist() == [1, 2, 3]  # row 1, column 2
    assert stencil.index[5].tolist() == [-1, 0, 1] and stencil.index[9].tolist() == [3, 4, -1]  # the edges
    assert stencil.index[:5].eq(-1).all()  # the first row has nothing above it
    model, cfg = build("imagegpt_above")
    toks = make_batch(cfg, B=1)["tokens"]
    changed = toks.clone()
    changed[0, 7] = (changed[0, 7] + 1) % cfg.vocab_size  # above-right of 11, above 12, above-left of 13
    moved = (model.above(toks, 0, 25) - model.above(changed, 0, 25)).abs().sum(-1)[0]  # (25,)
    assert moved.nonzero().flatten().tolist() == [11, 12, 13]
    seq, _ = build("text_to_image_above")
    assert seq.above is not None and build("text_to_image")[0].above is None
    with pytest.raises(ValueError, match="square"):
        ImageGPT(ImageGPTConfig(vocab_size=16, seq_len=24, row_above=True, **SMALL))
    with pytest.raises(ValueError, match="square"):
        text_to_image_config(n_codes=16, n_tokens=12, tgt_row_above=True)
    with pytest.raises(ValueError, match="codes="):
        seq.decode(torch.zeros(1, 1, dtype=torch.long), *seq.encode(TOK.batch_encode(CAPTIONS[:1], 24)))


def test_seq2seq_source_padding_is_masked():
    model, cfg = build("text_to_image")
    tgt = make_batch(cfg, B=2)["tgt"]
    long_src, short_src = TOK.batch_encode(CAPTIONS[:2], 24), TOK.batch_encode(CAPTIONS[:2], 20)
    assert (long_src == PAD_ID).sum() > (short_src == PAD_ID).sum() > 0
    a = model({"src": long_src, "tgt": tgt})[0]
    b = model({"src": short_src, "tgt": tgt})[0]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # PAD keys are never attended to


@pytest.mark.parametrize("name", ["imagegpt", "imagegpt_cond", "imagegpt_above"])
def test_imagegpt_cache_matches_full_forward(name):
    model, cfg = build(name)
    batch = make_batch(cfg, B=2)
    full = model(batch)[0]  # (B, L, V)
    cache, toks = model.transformer.new_cache(), batch["tokens"]
    x = torch.cat([model._start(2, batch.get("label")), model.tok_emb(toks[:, :5])], dim=1)
    steps = [model._step(model._with_above(x, toks, 0), cache)]  # a prefill of 6 positions, a chunk of 4, then 1s
    steps.append(model._step(model._with_above(model.tok_emb(toks[:, 5:9]), toks, 6), cache))
    for t in range(9, cfg.seq_len - 1):
        steps.append(model._step(model._with_above(model.tok_emb(toks[:, t : t + 1]), toks, t + 1), cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["imagegpt", "imagegpt_cond", "imagegpt_above"])
def test_imagegpt_greedy_generate_equals_uncached_argmax(name):
    model, cfg = build(name)
    label = torch.tensor([0, 2]) if cfg.n_classes else None
    toks = torch.zeros(2, 0, dtype=torch.long)
    for _ in range(cfg.seq_len):  # uncached: the whole prefix again at every step
        batch = {"tokens": torch.cat([toks, torch.zeros(2, 1, dtype=torch.long)], dim=1)}
        if label is not None:
            batch["label"] = label
        toks = torch.cat([toks, model(batch)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    out = model.generate(2, temperature=0.0, label=label)
    assert out.shape == (2, cfg.seq_len)
    assert torch.equal(out, toks)
    prompt = toks[:, :7]
    assert torch.equal(model.generate(2, temperature=0.0, label=label, prompt=prompt), toks)  # completion
    g = torch.Generator().manual_seed(0)
    sampled = model.generate(2, temperature=1.0, top_k=4, label=label, generator=g)
    assert sampled.shape == (2, cfg.seq_len) and 0 <= sampled.min() and sampled.max() < cfg.vocab_size


@pytest.mark.parametrize("name", ["audio_to_text", "text_to_image", "text_to_image_grid", "text_to_image_above"])
def test_seq2seq_cache_matches_full_decode(name):
    model, cfg = build(name)
    batch = make_batch(cfg, B=2)
    memory, mask = model.encode(batch["src"])
    tgt_in = torch.cat([torch.full((2, 1), cfg.bos_id), batch["tgt"][:, :-1]], dim=1)
    full = model.decode(tgt_in, memory, mask, codes=batch["tgt"])
    cache = model.decoder.new_cache()
    steps = [model.decode(tgt_in[:, t : t + 1], memory, mask, cache, batch["tgt"][:, :t])
             for t in range(tgt_in.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)
    assert cache.layers[0]["cross"]["k"].shape == (2, 2, memory.shape[1], 16)  # computed once, (B, nh, S, hs)


@pytest.mark.parametrize("name", ["audio_to_text", "text_to_image", "text_to_image_grid", "text_to_image_above"])
def test_seq2seq_greedy_generate_equals_uncached_argmax(name):
    model, cfg = build(name)
    src = make_batch(cfg, B=3)["src"]
    memory, mask = model.encode(src)
    toks = torch.full((3, 1), cfg.bos_id)
    done = torch.zeros(3, dtype=torch.bool)
    fill = cfg.pad_id if cfg.pad_id >= 0 else cfg.eos_id
    for _ in range(cfg.tgt_len):  # uncached reference, same rules: never BOS/PAD, pad after EOS
        logits = model.decode(toks, memory, mask, codes=toks[:, 1:])[:, -1]
        logits[:, [i for i in (cfg.bos_id, cfg.pad_id) if i >= 0]] = float("-inf")
        nxt = torch.where(done, torch.tensor(fill), logits.argmax(-1))
        toks = torch.cat([toks, nxt[:, None]], dim=1)
        done |= nxt == cfg.eos_id
        if cfg.eos_id >= 0 and done.all():
            break
    out = model.generate(src, temperature=0.0)
    assert torch.equal(out, toks[:, 1:])
    assert not (out == cfg.bos_id).any()


def test_sample_logits():
    logits = torch.tensor([[0.0, 5.0, 1.0, -2.0], [3.0, 0.0, 0.0, 2.9]])
    assert sample_logits(logits, 0.0).tolist() == [1, 0]
    assert sample_logits(logits, 1.0, top_k=1).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    picks = torch.stack([sample_logits(logits, 1.0, top_k=2, generator=g) for _ in range(200)])
    assert set(picks[:, 0].tolist()) <= {1, 2} and set(picks[:, 1].tolist()) == {0, 3}


def test_pos_embed_resizes_to_new_grid():
    model, cfg = build("vit")  # table learned for 16x16 = a 4x4 grid
    logits, _ = model({"image": torch.randn(2, 3, 24, 24)})  # a 6x6 grid
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    pos = model.encoder.pos_embed.detach()
    assert resize_pos_embed(pos, (4, 4), (4, 4)) is pos
    new = resize_pos_embed(pos, (4, 4), (6, 6))
    assert new.shape == (1, 1 + 36, 32)
    torch.testing.assert_close(new[:, 0], pos[:, 0])  # the CLS position is untouched
    const = torch.ones(1, 1 + 16, 3)
    torch.testing.assert_close(resize_pos_embed(const, (4, 4), (6, 6)), torch.ones(1, 37, 3))
    ramp = torch.arange(4.0).repeat_interleave(4)[None, :, None]  # value = row index on the 4x4 grid
    rows = resize_pos_embed(torch.cat([torch.zeros(1, 1, 1), ramp], 1), (4, 4), (8, 8), mode="bilinear")
    rows = rows[0, 1:, 0].reshape(8, 8)
    assert torch.allclose(rows, rows[:, :1])  # still constant along each row
    assert (rows[1:, 0] >= rows[:-1, 0]).all() and rows[0, 0] == 0 and rows[-1, 0] == 3  # increasing, ends kept


def test_vit_32_to_48():
    torch.manual_seed(0)
    model = ViT(ViTConfig(img_size=32, patch_size=4, depth=1, **SMALL)).eval()
    logits, _ = model({"image": torch.randn(2, 3, 48, 48)})
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    assert model.forward_features(torch.randn(2, 3, 48, 48)).shape == (2, 1 + 144, 32)
    ast, acfg = build("ast")
    assert ast({"mel": torch.randn(2, acfg.n_mels, 64)})[0].shape == (2, 5)  # a longer clip


OVERFIT = [name for name in TINY if name != "clip_bidir"]  # every model and preset


@pytest.mark.parametrize("name", OVERFIT)
def test_overfits_one_batch(name):
    model, cfg = build(name)
    model.train()
    batch = make_batch(cfg, B=4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    first = model(batch)[1].item()
    loss = first
    for _ in range(300):
        opt.zero_grad(set_to_none=True)
        loss_t = model(batch)[1]
        loss_t.backward()
        opt.step()
        loss = loss_t.item()
        if loss <= 0.1 * first:
            break
    assert loss <= 0.1 * first, f"{name}: loss {first:.3f} -> {loss:.3f}"


@pytest.mark.parametrize("name", TINY)
def test_checkpoint_round_trip(name, tmp_path):
    model, cfg = build(name)
    path = tmp_path / "ckpt.pt"
    torch.save({"config": asdict(model.cfg), "model": model.state_dict()}, path)
    ckpt = torch.load(path, weights_only=True)
    torch.manual_seed(123)  # a different init, so equality below comes from the loaded weights
    clone = type(model)(type(cfg)(**ckpt["config"])).eval()
    clone.load_state_dict(ckpt["model"])
    batch = make_batch(cfg)
    assert clone.cfg == cfg
    torch.testing.assert_close(clone(batch)[0], model(batch)[0], rtol=0, atol=0)


@pytest.mark.parametrize("name", TINY)
def test_bf16_autocast_cpu(name):
    model, cfg = build(name)
    batch = make_batch(cfg)
    with torch.no_grad():
        ref = model(batch)[1]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, loss = model(batch)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out.float()).all()
    assert abs(loss.item() - ref.item()) < 0.05 * ref.item() + 0.05


def test_zero_shot_classifier():
    model, cfg = build("clip")
    names, templates = ["red circle", "blue square", "green triangle"], ["a photo of a {}.", "a {}", "{}"]
    w = model.zero_shot_classifier(names, templates, TOK)
    assert w.shape == (cfg.embed_dim, 3)
    torch.testing.assert_close(w.norm(dim=0), torch.ones(3))
    for j, name in enumerate(names):  # the ensemble: normalised mean of the normalised prompt embeddings
        emb = model.encode_text(TOK.batch_encode([t.format(name) for t in templates], cfg.context_len), True)
        torch.testing.assert_close(w[:, j], torch.nn.functional.normalize(emb.mean(0), dim=0))
    images = make_batch(cfg)["image"]
    logits = model.zero_shot_logits(images, w)
    assert logits.shape == (4, 3)
    torch.testing.assert_close(logits, model.scale() * model.encode_image(images, normalize=True) @ w)
    clap, acfg = build("clap")
    wa = clap.zero_shot_classifier(names, templates, TOK)
    assert clap.zero_shot_logits(make_batch(acfg)["mel"], wa).shape == (4, 3)
    with pytest.raises(ValueError):
        clap.encode_image(images)


def test_clip_logit_scale_and_text_pooling():
    model, cfg = build("clip")
    assert model.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.scale().item() == 100.0  # clamped as CLIP does
    text = TOK.batch_encode(["a red circle"], cfg.context_len)  # 12 bytes + EOS, then PAD
    after = text.clone()
    after[0, 14] = ord("z")  # a real token after EOS moves the pooled position
    assert not torch.allclose(model.encode_text(text), model.encode_text(after))
    short = TOK.batch_encode(["a red circle"], 16)  # the amount of padding does not matter
    torch.testing.assert_close(model.encode_text(short), model.encode_text(text), atol=1e-5, rtol=1e-5)
    bidir, _ = build("clip_bidir")  # bidirectional: the padding mask keeps PAD out of every token
    torch.testing.assert_close(bidir.encode_text(short), bidir.encode_text(text), atol=1e-5, rtol=1e-5)


def test_tokenizer():
    ids = TOK.encode("héllo", max_len=10)
    assert ids[:7] == list("héllo".encode()) + [EOS_ID] and ids[7:] == [PAD_ID] * 3
    assert TOK.decode(ids) == "héllo"
    assert TOK.encode("abcdef", max_len=4) == [97, 98, 99, EOS_ID]  # truncation keeps EOS
    assert TOK.encode("ab", bos=True, eos=False)[0] == 257
    batch = TOK.batch_encode(["a", "abc"])
    assert batch.dtype == torch.long and batch.shape == (2, 4) and batch[0, 2] == PAD_ID
    assert TOK.batch_decode(batch) == ["a", "abc"]
    assert TOK.vocab_size == 259


def test_flops_hand_count():
    """ViT, 8x8x3 image, patch 4 -> m = 4 patches, T = 5 tokens, D = 8, 1 layer, MLP H = 32, 2 classes.

    patch embedding  2 * (4*4*3) * 8 * 4          = 3072
    q, k, v, o       2 * 5 * 4 * 8*8              = 2560
    QK^T and AV      2 * (2 * 5 * 5 * 8)          =  800
    MLP              2 * 5 * (8*32 + 32*8)        = 5120
    head             2 * 8 * 2                    =   32
    forward                                        = 11584; training = 3 * 11584 = 34752
    """
    model = ViT(ViTConfig(img_size=8, patch_size=4, n_classes=2, dim=8, depth=1, n_heads=2))
    assert model.flops_per_sample(train=False) == 11584
    assert model.flops_per_sample() == 34752


def counted_forward_flops(model, batch) -> int:
    """FLOPs torch itself counts (matmuls, convolutions, attention on the math backend) for one forward."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(batch)
    return counter.get_total_flops()


@pytest.mark.parametrize("name", ["vit", "ast", "imagegpt", "audio_to_text", "text_to_image", "tts", "clip", "clap"])
def test_flops_match_torch_counter(name):
    model, cfg = build(name)
    batch = make_batch(cfg, B=2)
    expected = 2 * model.flops_per_sample(train=False)
    if isinstance(cfg, CLIPConfig):
        expected += 2 * 2 * 2 * cfg.embed_dim  # the (B, B) similarity matrix, left out of the per-sample count
    assert counted_forward_flops(model, batch) == expected


def _compile_or_skip(model, batch):
    try:
        return torch.compile(model)(batch)
    except Exception as e:  # noqa: BLE001 - an inductor toolchain failure is the machine's, not the model's
        pytest.skip(f"torch.compile failed on this machine's inductor C++ toolchain: {type(e).__name__}: {e}"[:300])


def test_torch_compile_smoke():
    """Forward only (about 25 s cold on two CPU cores; the inductor cache makes reruns quicker)."""
    model, cfg = build("vit")
    batch = make_batch(cfg, B=2)
    with torch.no_grad():
        out, loss = _compile_or_skip(model, batch)
        torch.testing.assert_close(out, model(batch)[0], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_torch_compile_training_step():
    """Forward and backward through inductor (about 45 s cold on two CPU cores)."""
    model, cfg = build("imagegpt")
    batch = make_batch(cfg, B=2)
    ref = torch.autograd.grad(model(batch)[1], list(model.parameters()))
    out, loss = _compile_or_skip(model, batch)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    for g, r in zip(grads, ref, strict=True):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("cls", [ViT, AST, ImageGPT, Seq2Seq, CLIP], ids=lambda c: c.__name__)
def test_docstring_parameter_counts(cls):
    """Each model file states its default config's parameter count; keep it true."""
    doc = sys.modules[cls.__module__].__doc__
    stated = int(re.search(r"([\d,]+) parameters", doc).group(1).replace(",", ""))
    assert sum(p.numel() for p in cls().parameters()) == stated  # the default config


# ---------------------------------------------------------------------------------------------------- regularisers
def _vit_pair(**kw):
    """A tiny ViT with `kw` and one without, holding the same weights."""
    torch.manual_seed(0)
    cfg = ViTConfig(img_size=16, patch_size=4, n_classes=5, depth=3, **SMALL)
    plain = ViT(cfg)
    other = ViT(ViTConfig(**{**asdict(cfg), **kw}))
    other.load_state_dict(plain.state_dict())
    return plain, other


def test_drop_path_is_the_identity_at_zero_and_in_eval_mode():
    from models.transformer import drop_path

    plain, dropped = _vit_pair(drop_path=0.5)
    assert [b.drop_path for b in dropped.encoder.transformer.blocks] == [0.0, 0.25, 0.5]  # linear, as DeiT
    assert sum(p.numel() for p in ViT(ViTConfig(drop_path=0.3)).parameters()) == 2_693_578  # no new parameters
    x = torch.randn(6, 3, 16, 16)
    torch.testing.assert_close(dropped.eval()(dict(image=x))[0], plain.eval()(dict(image=x))[0], rtol=0, atol=0)
    plain.train()
    rng = torch.get_rng_state()
    train_out = plain(dict(image=x))[0]
    assert torch.equal(torch.get_rng_state(), rng)  # p = 0 draws nothing: existing models' runs are unchanged
    torch.testing.assert_close(train_out, plain.eval()(dict(image=x))[0], rtol=0, atol=0)
    dropped.train()
    assert not torch.allclose(dropped(dict(image=x))[0], train_out)
    branch = torch.ones(4000, 3, 2)
    out = drop_path(branch, 0.25, training=True)
    per_sample = out[:, 0, 0]
    assert ((per_sample == 0) | (per_sample == 1 / 0.75)).all() and (out == per_sample[:, None, None]).all()
    assert abs(float((per_sample == 0).float().mean()) - 0.25) < 0.03  # dropped with probability p, mean kept
    assert drop_path(branch, 0.25, training=False) is branch and drop_path(branch, 0.0, training=True) is branch


def test_label_smoothing_follows_cross_entropy_and_only_in_training():
    plain, smooth = _vit_pair(label_smoothing=0.1)
    torch.manual_seed(1)
    batch = dict(image=torch.randn(8, 3, 16, 16), label=torch.randint(0, 5, (8,)))
    logits, ce = plain.eval()(batch)
    logp = logits.log_softmax(-1)
    nll = -logp.gather(1, batch["label"][:, None]).mean()
    uniform = -logp.mean()  # cross-entropy against the uniform distribution over the 5 classes
    _, loss = smooth.train()(batch)
    torch.testing.assert_close(loss, 0.9 * nll + 0.1 * uniform)
    assert loss > ce  # the model's guesses are not uniform, so smoothing raises the loss
    torch.testing.assert_close(smooth.eval()(batch)[1], ce)  # evaluation reports plain cross-entropy
    soft = torch.nn.functional.one_hot(batch["label"], 5).float()  # soft targets (mixup, cutmix) are accepted
    torch.testing.assert_close(smooth.train()(dict(batch, label=soft))[1], loss)


def test_monotonic_alignment_finds_each_bytes_frames():
    """Frames that are noisy copies of their byte's mean, bytes over 2, 6, 3, 5, 4 frames then silence: the search
    returns exactly that path (-1 past the speech); a clip with more bytes than frames gets no path."""
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(2, 7, 8, generator=g) * 3  # (B, Ls, n_mels) each byte's mean
    truth = torch.tensor([i for i, d in enumerate([2, 6, 3, 5, 4]) for _ in range(d)])  # (20,)
    frames = torch.zeros(2, 24, 8)
    frames[:, :20] = mu[:, truth] + 0.3 * torch.randn(2, 20, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]]).bool()
    path = monotonic_alignment(-torch.cdist(mu, frames, p=1), mask, torch.tensor([20, 5]))
    assert path[0].tolist() == truth.tolist() + [-1] * 4
    assert (path[1] == -1).all()  # 7 bytes cannot be spoken in 5 frames


def test_tts_learns_its_alignment_from_the_search():
    """align="mas": the loss adds the prior and share terms, and 30 optimiser steps bring that term down (the prior
    head fits the bytes' frames, the share head the searched path); align="soft" has no prior head; an unknown align is
    a clear error."""
    model, cfg = build("tts")
    g = torch.Generator().manual_seed(0)
    src = TOK.batch_encode(["a red", "blue"], cfg.src_len)  # fewer bytes than the 16 speech frames
    mel = torch.full((2, cfg.n_mels, cfg.n_frames), -3.0)  # silence after 16 frames
    mel[:, :, :16] = torch.randn(2, cfg.n_mels, 4, generator=g).repeat_interleave(4, -1)  # 4 sounds of 4 frames
    batch = {"src": src, "mel": mel}

    def align_loss():
        memory, mask, _, share = model.encode(batch["src"], mel)
        shares, loss = model.aligned_shares(memory, mask, share, mel, model.speech_length(mel))
        assert torch.allclose(shares.sum(-1), torch.ones(2))
        return loss

    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = align_loss().item()
    for _ in range(30):
        opt.zero_grad()
        model(batch)[1].backward()
        opt.step()
    assert first > 0 and align_loss().item() < 0.7 * first
    assert TTS(replace(cfg, align="soft")).prior is None
    with pytest.raises(ValueError, match="align"):
        TTS(replace(cfg, align="hard"))


def test_tts_lays_the_bytes_out_in_order_and_speaks_in_the_reference_voice():
    """Gaussian upsampling at equal shares: the byte each query mixes most moves forward with time, from the first
    bytes to the last. The speech length is the frame after the last loud one. A different reference voice changes the
    generated spectrogram; generating without one is a clear error."""
    model, cfg = build("tts")
    batch = make_batch(cfg, B=2)
    memory, mask, _, share = model.encode(batch["src"], batch["mel"])
    assert torch.allclose(share.sum(-1), torch.ones(2)) and (share[~mask] == 0).all()
    torch.testing.assert_close(model.speech_length(batch["mel"]), torch.tensor([12.0, 13.0]))  # silent from 12, 13
    n = int(mask[0].sum())
    eye = torch.eye(memory.shape[1])[None].expand(1, -1, -1)  # memory = one-hot byte index: the mix is the weights
    w = model.upsample(eye, mask[:1], torch.full((1, memory.shape[1]), 1.0 / n) * mask[:1], torch.tensor([24.0]))
    nearest = w[0].argmax(-1)  # (n_q,) the byte each query is made of most: queries every 4 of 24 frames, bytes
    assert torch.allclose(w.sum(-1), torch.ones(1, 6))  # every 24 / n frames, so the first query sits on byte 1
    assert nearest[0] <= 1 and nearest[-1] >= n - 2 and (nearest.diff() > 0).all()
    with torch.no_grad():
        a = model.generate(batch["src"], batch["mel"])
        b = model.generate(batch["src"], batch["mel"].flip(0))
    assert a.shape == (2, cfg.n_mels, cfg.n_frames) and not torch.allclose(a, b)
    with pytest.raises(ValueError, match="reference voice"):
        model.generate(batch["src"])
