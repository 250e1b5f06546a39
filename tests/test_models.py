"""Model tests: shapes, causality, KV cache, positional resizing, overfitting, checkpoints, bf16, CLIP, tokenizer.

Tiny configs throughout (tests/tiny_models.py) so the file runs in well under a minute on two CPU cores.
FLOPs and compile: test_model_costs.py; regularisers: test_regularisers.py; the TTS alignment: test_tts_alignment.py."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from models import (
    AST,
    CLIP,
    EOS_ID,
    PAD_ID,
    ASTConfig,
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
from models.tts import TTS, TTSConfig
from tests.tiny_models import CAPTIONS, SMALL, TINY, TOK, _one_thread, build, make_batch  # noqa: F401 (fixture)


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
