"""Encoder-decoder transformer (Vaswani et al.), the pattern of Whisper (audio -> text) and Parti (text -> image).

The encoder reads the source embedding; the decoder reads the target tokens with causal self-attention plus
cross-attention to the encoder output, and a head (tied to the target embedding, as Whisper) gives the next target
token. One class, two source embeddings and any target vocabulary; two presets:
    audio_to_text:  src = log-mel (B, n_mels, n_frames), Whisper's conv stem; tgt = byte tokens (tokenizer.py)
    text_to_image:  src = byte tokens (B, Ls);                                  tgt = VQ image-patch codes
(Text-to-speech regresses the spectrogram itself: models/tts.py.)
Teacher forcing: the decoder input is [BOS, tgt[:, :-1]] and the loss ignores pad_id. VQ targets have no pad and
no EOS (pad_id = eos_id = -1); their BOS is the extra id n_codes.
Default config (bytes -> bytes, D=192, 4 + 4 layers, 3 heads): 4,265,856 parameters; presets: audio_to_text
4,400,832, text_to_image (512 codes, 64 tokens) 4,314,624.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.embeddings import RowAbove, raster_side, sinusoidal
from models.rng import Dropout
from models.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE
from models.transformer import KVCache, Transformer, init_weights, sample_logits


@dataclass(frozen=True)
class Seq2SeqConfig:
    src_kind: str = "tokens"  # "tokens": (B, Ls) long ids; "mel": (B, n_mels, n_frames) float
    src_vocab: int = VOCAB_SIZE
    src_pad_id: int = PAD_ID  # masked out of attention
    src_len: int = 64  # longest token source
    n_mels: int = 128
    n_frames: int = 128  # the mel stem halves it: n_frames // 2 encoder positions
    tgt_vocab: int = VOCAB_SIZE  # embedding rows = head outputs, specials included
    tgt_len: int = 64  # longest target (learned positions)
    bos_id: int = BOS_ID
    eos_id: int = EOS_ID  # -1: none (generate runs to max_len)
    pad_id: int = PAD_ID  # -1: none; ignored by the loss
    dim: int = 192
    enc_depth: int = 4
    dec_depth: int = 4
    n_heads: int = 3
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    src_embed_std: float = 1.0  # init of a token source's embedding (the sinusoidal positions have std 0.71)
    # > 0: the target is a raster of image codes tgt_grid wide, placed by a learned row plus a learned column embedding
    # (DALL-E's) instead of one learned embedding per position: the codes of one column share what places them
    tgt_grid: int = 0
    # the target is a square raster of image codes, and each decoder input also embeds the codes above-left, above and
    # above-right of the one it predicts (models/embeddings.py RowAbove; decode then needs the codes so far)
    tgt_row_above: bool = False

    def __post_init__(self):
        if self.tgt_grid and self.tgt_len % self.tgt_grid:
            raise ValueError(f"tgt_grid={self.tgt_grid} must divide tgt_len={self.tgt_len} (a raster of whole rows)")
        if self.tgt_row_above:
            raster_side(self.tgt_len, "tgt_row_above")


class MelStem(nn.Module):
    """Whisper's audio stem: two 3-wide convolutions with GELU, the second with stride 2.

    (B, n_mels, n_frames) -> (B, ceil(n_frames / 2), D).
    """

    def __init__(self, n_mels: int, dim: int):
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, dim, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(dim, dim, kernel_size=3, stride=2, padding=1)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv2(F.gelu(self.conv1(mel))))  # (B, D, ceil(n_frames / 2))
        return x.transpose(1, 2)  # (B, S, D)


class Seq2Seq(nn.Module):
    """batch {"src": ..., "tgt": (B, Lt) long} -> (logits (B, Lt, tgt_vocab), loss); logits[:, i] predicts tgt[:, i]."""

    def __init__(self, cfg: Seq2SeqConfig = Seq2SeqConfig()):
        super().__init__()
        self.cfg = cfg
        if cfg.src_kind == "mel":
            self.src_embed = MelStem(cfg.n_mels, cfg.dim)
            n_src = (cfg.n_frames + 1) // 2
        elif cfg.src_kind == "tokens":
            self.src_embed = nn.Embedding(cfg.src_vocab, cfg.dim)
            n_src = cfg.src_len
        else:
            raise ValueError(f"src_kind={cfg.src_kind!r}: expected 'tokens' or 'mel'")
        self.register_buffer("src_pos", sinusoidal(n_src, cfg.dim), persistent=False)  # (S, D)
        self.encoder = Transformer(cfg.dim, cfg.enc_depth, cfg.n_heads, cfg.mlp_ratio, cfg.dropout)
        self.tgt_embed = nn.Embedding(cfg.tgt_vocab, cfg.dim)
        if cfg.tgt_grid:  # learned, (rows, D) and (cols, D)
            self.tgt_row = nn.Parameter(torch.zeros(cfg.tgt_len // cfg.tgt_grid, cfg.dim))
            self.tgt_col = nn.Parameter(torch.zeros(cfg.tgt_grid, cfg.dim))
        else:
            self.tgt_pos = nn.Parameter(torch.zeros(cfg.tgt_len, cfg.dim))  # learned, (Lt, D)
        self.above = (RowAbove(cfg.tgt_vocab, cfg.dim, raster_side(cfg.tgt_len, "tgt_row_above"), cfg.tgt_len)
                      if cfg.tgt_row_above else None)
        self.decoder = Transformer(cfg.dim, cfg.dec_depth, cfg.n_heads, cfg.mlp_ratio, cfg.dropout,
                                   causal=True, cross=True)
        self.drop = Dropout(cfg.dropout)
        self.apply(init_weights)
        for pos in (self.tgt_row, self.tgt_col) if cfg.tgt_grid else (self.tgt_pos,):
            nn.init.normal_(pos, std=0.02)
        if cfg.src_kind == "tokens":  # as large as the sinusoidal positions it is added to: at std 0.02 they drown
            nn.init.normal_(self.src_embed.weight, std=cfg.src_embed_std)  # the caption (README "What the models learn")

    def encode(self, src: torch.Tensor):
        """src -> (memory (B, S, D), memory_mask (B, S) bool or None); mask True for real source tokens."""
        mask = (src != self.cfg.src_pad_id) if self.cfg.src_kind == "tokens" else None
        x = self.src_embed(src)  # (B, S, D)
        if x.shape[1] > self.src_pos.shape[0]:
            raise ValueError(f"source of {x.shape[1]} positions is longer than the {self.src_pos.shape[0]} configured")
        x = self.drop(x + self.src_pos[: x.shape[1]])  # (B, S, D)
        return self.encoder(x, key_mask=mask), mask

    def decode(self, tgt_in: torch.Tensor, memory, memory_mask=None, cache: KVCache | None = None,
               codes: torch.Tensor | None = None):
        """Decoder inputs (B, T) at positions len(cache)..len(cache)+T-1 -> logits (B, T, tgt_vocab). With
        tgt_row_above, `codes` (B, >= t0+T-1) are the target codes known so far (the raster the inputs come from)."""
        t0, T = 0 if cache is None else len(cache), tgt_in.shape[1]
        if t0 + T > self.cfg.tgt_len:
            raise ValueError(f"target position {t0 + T} exceeds tgt_len={self.cfg.tgt_len}")
        x = self.tgt_embed(tgt_in) + self.target_positions()[t0 : t0 + T]  # (B, T, D)
        if self.above is not None:
            if codes is None:
                raise ValueError("tgt_row_above: decode needs the target codes so far (codes=)")
            x = x + self.above(codes, t0, T)
        x = self.drop(x)
        x = self.decoder(x, memory=memory, memory_mask=memory_mask, cache=cache)  # (B, T, D)
        return x @ self.tgt_embed.weight.T  # (B, T, V), head tied to the target embedding

    def target_positions(self) -> torch.Tensor:
        """(tgt_len, D): each target position's embedding (with tgt_grid, its row's plus its column's)."""
        if not self.cfg.tgt_grid:
            return self.tgt_pos
        return (self.tgt_row[:, None] + self.tgt_col[None, :]).flatten(0, 1)

    def forward(self, batch: dict[str, torch.Tensor]):
        memory, mask = self.encode(batch["src"])
        tgt = batch["tgt"]  # (B, Lt)
        bos = torch.full_like(tgt[:, :1], self.cfg.bos_id)  # (B, 1)
        logits = self.decode(torch.cat([bos, tgt[:, :-1]], dim=1), memory, mask, codes=tgt)  # (B, Lt, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tgt.flatten(), ignore_index=self.cfg.pad_id)  # (B*Lt, V)
        return logits, loss

    def _mask_specials(self, logits: torch.Tensor) -> torch.Tensor:
        """BOS and PAD are never generated: (B, V) -> (B, V) with their logits at -inf."""
        banned = [i for i in (self.cfg.bos_id, self.cfg.pad_id) if i >= 0]
        return logits.index_fill(-1, torch.tensor(banned, device=logits.device), float("-inf"))

    @torch.no_grad()
    def generate(self, src: torch.Tensor, max_len: int | None = None, temperature: float = 0.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """src -> (B, T) generated target tokens (no BOS), T <= max_len (default tgt_len).

        temperature=0: greedy. Self-attention keys/values are cached step by step, the cross-attention ones once.
        Stops when every row has produced EOS; later positions of finished rows hold pad_id (eos_id if no pad).
        """
        max_len = min(max_len or self.cfg.tgt_len, self.cfg.tgt_len)
        memory, mask = self.encode(src)
        cache = self.decoder.new_cache()
        fill = self.cfg.pad_id if self.cfg.pad_id >= 0 else self.cfg.eos_id
        nxt = torch.full((src.shape[0],), self.cfg.bos_id, dtype=torch.long, device=memory.device)  # (B,)
        done = torch.zeros_like(nxt, dtype=torch.bool)
        out = nxt[:, None][:, :0]  # (B, t): the tokens so far
        for _ in range(max_len):
            logits = self._mask_specials(self.decode(nxt[:, None], memory, mask, cache, out)[:, -1])  # (B, V)
            nxt = sample_logits(logits, temperature, top_k, generator)  # (B,)
            nxt = torch.where(done, torch.full_like(nxt, fill), nxt)
            out = torch.cat([out, nxt[:, None]], dim=1)
            done = done | (nxt == self.cfg.eos_id)
            if self.cfg.eos_id >= 0 and bool(done.all()):
                break
        return out  # (B, T)

    def flops_per_sample(self, train: bool = True) -> int:
        """Matmul FLOPs for one (source, target) pair at the configured lengths (x3 when train):
        source embedding + encoder over S + decoder over Lt with cross-attention to S + tied head."""
        c = self.cfg
        if c.src_kind == "mel":
            S = (c.n_frames + 1) // 2
            embed = 2 * (3 * c.n_mels * c.dim) * c.n_frames + 2 * (3 * c.dim * c.dim) * S  # the two convolutions
        else:
            S, embed = c.src_len, 0  # a table lookup
        fwd = embed + self.encoder.flops(S) + self.decoder.flops(c.tgt_len, S) + 2 * c.tgt_len * c.dim * c.tgt_vocab
        return 3 * fwd if train else fwd


def audio_to_text_config(**overrides) -> Seq2SeqConfig:
    """Speech recognition (Whisper): log-mel in, byte tokens out (EOS-terminated, PAD-padded)."""
    return replace(Seq2SeqConfig(src_kind="mel"), **overrides)


def text_to_image_config(n_codes: int = 512, n_tokens: int = 64, **overrides) -> Seq2SeqConfig:
    """Parti: caption bytes in, n_tokens VQ image-patch codes out (64 = an 8x8 grid of 4x4 patches of 32x32)."""
    base = Seq2SeqConfig(tgt_vocab=n_codes + 1, tgt_len=n_tokens, bos_id=n_codes, eos_id=-1, pad_id=-1)
    return replace(base, **overrides)


def audio_to_text(**overrides) -> Seq2Seq:
    return Seq2Seq(audio_to_text_config(**overrides))


def text_to_image(n_codes: int = 512, n_tokens: int = 64, **overrides) -> Seq2Seq:
    return Seq2Seq(text_to_image_config(n_codes, n_tokens, **overrides))
