"""Byte-level text tokenizer: no vocabulary file, no downloads, every string round-trips.

Ids 0..255 are the UTF-8 bytes of the text; three specials follow:
    PAD_ID = 256   padding (right-padded; losses and encoders ignore it)
    BOS_ID = 257   beginning of sequence (the seq2seq decoder prepends it itself: targets do not carry it)
    EOS_ID = 258   end of sequence (the CLIP text tower pools the last non-pad token, which is EOS)
VOCAB_SIZE = 259.
"""

from __future__ import annotations

import torch

PAD_ID, BOS_ID, EOS_ID = 256, 257, 258
VOCAB_SIZE = 259


class ByteTokenizer:
    """encode(str) -> ids, decode(ids) -> str, batch_encode(list[str]) -> LongTensor (B, L)."""

    pad_id, bos_id, eos_id, vocab_size = PAD_ID, BOS_ID, EOS_ID, VOCAB_SIZE

    def encode(self, text: str, max_len: int | None = None, bos: bool = False, eos: bool = True) -> list[int]:
        """UTF-8 bytes of `text`, with optional BOS/EOS, truncated and right-padded with PAD to `max_len`.

        Truncation keeps EOS as the last token, so a truncated text still ends like a complete one.
        """
        ids = ([BOS_ID] if bos else []) + list(text.encode("utf-8"))
        if max_len is not None:
            if max_len < int(bos) + int(eos):
                raise ValueError(f"max_len={max_len} leaves no room for the BOS/EOS tokens")
            ids = ids[: max_len - int(eos)]
        ids = ids + ([EOS_ID] if eos else [])
        if max_len is not None:
            ids = ids + [PAD_ID] * (max_len - len(ids))
        return ids

    def decode(self, ids) -> str:
        """Ids (list or 1-D tensor) -> text; specials are skipped, invalid UTF-8 becomes U+FFFD; stops at EOS."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out = bytearray()
        for i in ids:
            if i == EOS_ID:
                break
            if 0 <= i < 256:
                out.append(i)
        return out.decode("utf-8", errors="replace")

    def batch_encode(self, texts: list[str], max_len: int | None = None, bos: bool = False, eos: bool = True):
        """list of B strings -> LongTensor (B, L); L = max_len, or the longest encoded text when max_len is None."""
        rows = [self.encode(t, max_len, bos, eos) for t in texts]
        L = max_len if max_len is not None else max((len(r) for r in rows), default=0)
        padded = [r + [PAD_ID] * (L - len(r)) for r in rows]
        return torch.tensor(padded, dtype=torch.long).reshape(len(rows), L)  # (B, L), also when B = 0

    def batch_decode(self, ids: torch.Tensor) -> list[str]:
        """LongTensor (B, L) -> list of B strings."""
        return [self.decode(row) for row in ids.tolist()]
