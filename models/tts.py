"""Text-to-speech by mel-frame regression (non-autoregressive, FastSpeech-like; Ren et al. 2019), on bytes.

    memory  = Encoder(Embed(bytes) + pos) + W_v mean_spectrum(reference)     (B, Ls, D), pad bytes masked
    length  = Linear(mean(memory))                                           log of the speech's length in frames
    shares  = softmax(Linear(memory))                                        each byte's share of that length
    queries = GaussianUpsample(memory, shares * length) + E_frame            (B, n_frames / r, D), r frames each
    mel     = Linear(Decoder(queries [, cross-attention to memory]))        (B, n_mels, n_frames)

No codebook: the decoder writes the normalised log-mel itself, trained by L1 to the target. Gaussian upsampling (EATS,
Donahue et al. 2020; Non-Attentive Tacotron) lays the bytes out in order along the time axis, byte i over
shares_i * length frames, so the alignment is monotonic by construction. The shares are learned through the
upsampling alone (align="soft"), or (align="mas") from monotonic alignment search (Glow-TTS, Kim et al. 2020): a
prior head gives each byte's mean log-mel, the search finds the most likely monotonic path of the target's frames
through the bytes, its frames per byte place the queries in training (teacher forcing) and teach the share head (KL),
and the frames' L1 to their byte's mean trains the prior. With the alignment given, the decoder needs no
cross-attention to the text (cross=False, as FastSpeech), and without it reads the text the way inference places it.
The length head is trained on the target's speech length (frames up to the last louder than `silence`), which
also places the queries in training (teacher forcing); at inference it is predicted. Speakers differ (voice, pitch,
rate), and a regression to their average is a blur, so each clip is spoken in a reference voice (Skerry-Ryan et al.
2018, here its mean spectrum over its loud frames): in training batch["ref"], another clip of the same speaker
(tasks/train/batches.py; the clip itself would also carry its words), else the clip itself; at inference any clip.
The vocoder (Griffin-Lim) lives in tasks/. The config's defaults (soft, cross-attention, dropout 0.1) are the first
design's, which checkpoints written before the others existed hold; tasks/train/table.py trains with align="mas",
cross=False, dropout=0.0 (measured there).
Default config (D=128, 2 + 3 layers, 4 heads, 128 mels x 128 frames, r=4, 24 bytes): 1,327,362 parameters; the
table's (align="mas", cross=False): 1,144,962.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.embeddings import sinusoidal
from models.rng import Dropout
from models.tokenizer import PAD_ID, VOCAB_SIZE
from models.transformer import Transformer, init_weights


@dataclass(frozen=True)
class TTSConfig:
    src_vocab: int = VOCAB_SIZE
    src_pad_id: int = PAD_ID
    src_len: int = 24  # longest byte source
    n_mels: int = 128
    n_frames: int = 128  # the window the decoder writes
    reduction: int = 4  # frames per decoder position (Tacotron's r)
    dim: int = 128
    enc_depth: int = 2
    dec_depth: int = 3
    n_heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    voice_dim: int = 128  # a reference clip's voice: its mean loud spectrum through this many numbers (0: none)
    sigma: float = 4.0  # Gaussian upsampling's width, frames
    silence: float = -1.0  # a frame whose mean normalised log-mel is below this is silence (speech length)
    # how the bytes' shares of the speech are learned: "soft", through the upsampling alone; "mas", each byte's frames
    # found by monotonic alignment search against a per-byte mean spectrum (Glow-TTS) and taught to the share head
    align: str = "soft"
    cross: bool = True  # the decoder's cross-attention to the text (False: the upsampled text alone, as FastSpeech)


class TTS(nn.Module):
    """batch {"src": (B, Ls) byte ids, "mel": (B, n_mels, n_frames), optional "ref": (B, n_mels, T) whose voices} ->
    (mel (B, n_mels, n_frames), loss)."""

    def __init__(self, cfg: TTSConfig = TTSConfig()):
        super().__init__()
        if cfg.n_frames % cfg.reduction:
            raise ValueError(f"n_frames={cfg.n_frames} is not a multiple of reduction={cfg.reduction}")
        self.cfg = cfg
        self.src_embed = nn.Embedding(cfg.src_vocab, cfg.dim)
        self.register_buffer("src_pos", sinusoidal(cfg.src_len, cfg.dim), persistent=False)  # (Ls, D)
        self.encoder = Transformer(cfg.dim, cfg.enc_depth, cfg.n_heads, cfg.mlp_ratio, cfg.dropout)
        # the reference's mean spectrum (measured, round-trip CER on the built-in set: no voice 0.37, through 8
        # numbers 0.34, one linear map 0.26, through 128 numbers 0.25 at 1,600 steps and 0.40 at 800 with the length
        # head reading the text alone, not the voice: the voice tells the speaking rate)
        self.voice = nn.Sequential(nn.Linear(cfg.n_mels, cfg.voice_dim), nn.Linear(cfg.voice_dim, cfg.dim)) \
            if cfg.voice_dim else None
        self.length_head = nn.Linear(cfg.dim, 1)  # log of the speech length in frames
        self.dur_head = nn.Linear(cfg.dim, 1)  # each byte's share of the speech (softmax over the text)
        if cfg.align not in ("mas", "soft"):
            raise ValueError(f"align={cfg.align!r}: use 'mas' (alignment search) or 'soft' (through the upsampling)")
        self.prior = nn.Linear(cfg.dim, cfg.n_mels) if cfg.align == "mas" else None  # each byte's mean log-mel
        self.frame_pos = nn.Parameter(torch.zeros(self.n_queries, cfg.dim))  # absolute position of each query, learned
        self.decoder = Transformer(cfg.dim, cfg.dec_depth, cfg.n_heads, cfg.mlp_ratio, cfg.dropout, cross=cfg.cross)
        self.head = nn.Linear(cfg.dim, cfg.reduction * cfg.n_mels)
        self.drop = Dropout(cfg.dropout)
        self.apply(init_weights)
        nn.init.normal_(self.frame_pos, std=0.02)
        # as large as the sinusoidal positions it is added to: at init's std 0.02 the positions drown the bytes and
        # the model learns one spectrogram per length, whatever the text (README "What the models learn")
        nn.init.normal_(self.src_embed.weight, std=1.0)
        nn.init.zeros_(self.dur_head.weight)  # every byte an equal share to start with

    @property
    def n_queries(self) -> int:
        """Decoder positions: one per `reduction` frames."""
        return self.cfg.n_frames // self.cfg.reduction

    def loud(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, n_mels, T) normalised log-mel -> (B, T) bool: frames whose mean is above `silence`."""
        return mel.mean(1) > self.cfg.silence

    def encode(self, src: torch.Tensor, ref: torch.Tensor | None = None):
        """(B, Ls) bytes, reference log-mel (B, n_mels, T) or None -> (memory (B, Ls, D), mask (B, Ls) True for real
        bytes, log length (B,), byte shares (B, Ls)); the reference's voice is added to every memory position."""
        if src.shape[1] > self.cfg.src_len:
            raise ValueError(f"source of {src.shape[1]} bytes is longer than src_len={self.cfg.src_len}")
        mask = src != self.cfg.src_pad_id
        x = self.drop(self.src_embed(src) + self.src_pos[: src.shape[1]])  # (B, Ls, D)
        memory = self.encoder(x, key_mask=mask)  # (B, Ls, D)
        if self.voice is not None:
            memory = memory + self.voice(self.mean_spectrum(ref).to(memory.dtype))[:, None]  # (B, Ls, D)
        pooled = (memory * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)  # (B, D): text and voice
        share = self.dur_head(memory).squeeze(-1).float().masked_fill(~mask, float("-inf")).softmax(-1)  # (B, Ls)
        return memory, mask, self.length_head(pooled).squeeze(-1), share

    def mean_spectrum(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, n_mels, T) -> (B, n_mels): the mean over the loud frames, the voice's timbre and pitch region."""
        loud = self.loud(mel)[:, None].to(mel.dtype)  # (B, 1, T)
        return (mel * loud).sum(-1) / loud.sum(-1).clamp_min(1)

    def speech_length(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, n_mels, T) normalised log-mel -> (B,) float frames up to the last non-silent one (at least 1)."""
        loud = self.loud(mel)  # (B, T)
        t = torch.arange(1, mel.shape[-1] + 1, device=mel.device)
        return (loud * t).amax(-1).clamp_min(1).float()

    def upsample(self, memory, mask, share, length) -> torch.Tensor:
        """Gaussian upsampling (EATS, Non-Attentive Tacotron): byte i spans share_i * length frames in order; each
        query (a group of r frames) is the mix of the bytes whose span centres lie near it -> (B, n_frames / r, D)."""
        c = self.cfg
        ends = share.cumsum(-1) * length[:, None]  # (B, Ls) frames
        centres = ends - share * length[:, None] / 2  # (B, Ls)
        t = (torch.arange(self.n_queries, device=memory.device) + 0.5) * c.reduction  # (n_q,) frames
        logits = -((t[None, :, None] - centres[:, None, :]) ** 2) / (2 * c.sigma ** 2)  # (B, n_q, Ls)
        w = logits.masked_fill(~mask[:, None, :], float("-inf")).softmax(-1)  # (B, n_q, Ls)
        return w.to(memory.dtype) @ memory  # (B, n_q, D)

    def decode(self, memory, mask, share, length: torch.Tensor) -> torch.Tensor:
        """-> normalised log-mel (B, n_mels, n_frames); length (B,) in frames."""
        c = self.cfg
        B, n_q = memory.shape[0], self.n_queries
        q = self.upsample(memory, mask, share, length) + self.frame_pos[None]  # (B, n_q, D)
        y = self.decoder(self.drop(q), memory=memory if c.cross else None, memory_mask=mask)  # (B, n_q, D), final LN
        return self.head(y).view(B, n_q, c.reduction, c.n_mels).flatten(1, 2).transpose(1, 2)  # (B, n_mels, T)

    def forward(self, batch: dict[str, torch.Tensor]):
        target = batch["mel"].float()  # (B, n_mels, n_frames)
        ref = batch.get("ref", target)  # (B, n_mels, T) whose voice: another clip of the speaker, else the clip itself
        memory, mask, log_len, share = self.encode(batch["src"], ref)
        length = self.speech_length(target)  # (B,) teacher-forced: the real length places the queries
        loss = F.mse_loss(log_len.float(), length.log())
        if self.prior is not None:
            aligned, align_loss = self.aligned_shares(memory, mask, share, target, length)
            share, loss = aligned, loss + align_loss  # teacher-forced: the searched path places the bytes
        mel = self.decode(memory, mask, share, length)
        return mel, F.l1_loss(mel.float(), target) + loss

    def aligned_shares(self, memory, mask, share, target, length):
        """Glow-TTS's alignment: each byte's mean log-mel (prior head), the most likely monotonic path of the target's
        frames through the bytes (`monotonic_alignment`), each byte's frames on it -> (shares (B, Ls) to upsample
        with, loss: L1 of the frames to their byte's mean + KL divergence of the share head from the path's shares).
        A clip with fewer speech frames than bytes keeps the share head's own shares and adds no loss."""
        mu = self.prior(memory).float()  # (B, Ls, n_mels)
        frames = target.transpose(1, 2)  # (B, T, n_mels)
        with torch.no_grad():
            ll = -torch.cdist(mu, frames, p=1)  # (B, Ls, T) log-likelihood under a Laplace of scale 1, up to a constant
            path = monotonic_alignment(ll, mask, length.long())  # (B, T) byte of each frame, -1 past the speech
        on = (path >= 0).float()  # (B, T) frames on the path: none for a clip the search could not align
        ok = on.amax(1)  # (B,) clips the search aligned
        dur = F.one_hot(path.clamp_min(0), mask.shape[1]).float().mul(on[..., None]).sum(1)  # (B, Ls) frames a byte
        want = dur / length[:, None]  # (B, Ls)
        picked = mu.gather(1, path.clamp_min(0)[..., None].expand(-1, -1, mu.shape[-1]))  # (B, T, n_mels)
        prior = ((picked - frames).abs().mean(-1) * on).sum() / on.sum().clamp_min(1)
        kl = (want * (want.clamp_min(1e-8).log() - share.clamp_min(1e-8).log())).sum(-1)  # (B,) 0 when they agree
        kl = (kl * ok).sum() / ok.sum().clamp_min(1)
        shares = torch.where(ok[:, None] > 0, want, share)
        return shares, prior + kl

    @torch.no_grad()
    def generate(self, src: torch.Tensor, ref: torch.Tensor | None = None,
                 length: torch.Tensor | None = None) -> torch.Tensor:
        """(B, Ls) byte ids, reference log-mels (B, n_mels, T) whose voices to speak in -> normalised log-mel
        (B, n_mels, n_frames); length (B,) frames, default predicted (from the text and the voice)."""
        if self.voice is not None and ref is None:
            raise ValueError("this model speaks in a reference voice: pass ref, a (B, n_mels, T) log-mel")
        memory, mask, log_len, share = self.encode(src, ref)
        if length is None:
            length = log_len.float().exp().clamp(1, self.cfg.n_frames)
        return self.decode(memory, mask, share, length.float())

    def flops_per_sample(self, train: bool = True) -> int:
        """Matmul FLOPs for one (text, mel) pair: encoder over Ls, the voice's two maps, the share and length heads,
        the upsampling's mix, decoder over n_frames / r with cross-attention, the frame head (x3 when train)."""
        c, n_q = self.cfg, self.n_queries
        voice = 2 * c.voice_dim * (c.n_mels + c.dim)
        heads = 2 * c.src_len * c.dim + 2 * c.dim + (2 * c.src_len * c.dim * c.n_mels if c.align == "mas" else 0)
        fwd = (self.encoder.flops(c.src_len) + voice + heads + 2 * n_q * c.src_len * c.dim
               + self.decoder.flops(n_q, c.src_len) + 2 * n_q * c.dim * c.reduction * c.n_mels)
        return 3 * fwd if train else fwd


def monotonic_alignment(ll: torch.Tensor, mask: torch.Tensor, n_frames: torch.Tensor) -> torch.Tensor:
    """Monotonic alignment search (Glow-TTS, Kim et al. 2020): the path through (byte, frame) that starts at byte 0,
    frame 0, moves one frame a step, staying on its byte or going to the next, ends at the last byte on the last
    speech frame, and has the largest sum of ll. ll (B, Ls, T), mask (B, Ls) real bytes first, n_frames (B,) ->
    (B, T) long: each frame's byte, -1 past n_frames. Needs n_bytes <= n_frames (else that clip's path is -1)."""
    B, Ls, T = ll.shape
    n_bytes = mask.sum(1)  # (B,)
    ll = ll.masked_fill(~mask[..., None], float("-inf"))
    score = torch.full((B, Ls), float("-inf"), device=ll.device)
    score[:, 0] = ll[:, 0, 0]
    moved = torch.zeros(B, T, Ls, dtype=torch.bool, device=ll.device)  # the path came from the byte before
    for t in range(1, T):
        before = F.pad(score[:, :-1], (1, 0), value=float("-inf"))  # (B, Ls) the previous byte's score at t - 1
        moved[:, t] = before > score
        new = torch.maximum(score, before) + ll[:, :, t]
        score = torch.where((t < n_frames)[:, None], new, score)
    path = torch.full((B, T), -1, dtype=torch.long, device=ll.device)
    byte = (n_bytes - 1).clamp_min(0)  # (B,) the path ends on the last byte
    rows = torch.arange(B, device=ll.device)
    for t in range(T - 1, -1, -1):
        on = t < n_frames  # (B,)
        path[:, t] = torch.where(on, byte, path[:, t])
        byte = byte - (on & moved[rows, t, byte]).long()
    feasible = (n_bytes <= n_frames) & (n_bytes > 0)
    return path.masked_fill(~feasible[:, None], -1)
