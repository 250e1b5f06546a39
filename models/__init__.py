"""tessera's models: pure PyTorch, one transformer core (transformer.py) and one short file per model.

Every model: `Model(Config())`, `model.cfg`, `model(batch) -> (output, loss)` (loss None without targets), and
`model.flops_per_sample(train=True)` for MFU. Rebuild from a checkpoint with `Model(Config(**ckpt["config"]))`.
"""

from models.ast import AST, ASTConfig
from models.clip import CLIP, CLIPConfig
from models.embeddings import ConvStem, PatchEmbed, resize_pos_embed, sinusoidal
from models.imagegpt import ImageGPT, ImageGPTConfig
from models.seq2seq import (
    Seq2Seq,
    Seq2SeqConfig,
    audio_to_text,
    audio_to_text_config,
    text_to_image,
    text_to_image_config,
)
from models.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, ByteTokenizer
from models.transformer import MLP, Attention, Block, KVCache, Transformer, sample_logits
from models.tts import TTS, TTSConfig
from models.vit import ViT, ViTConfig, ViTEncoder
from models.vq import (
    Codebook,
    fit_kmeans,
    image_to_tokens,
    patchify,
    patchify_spec,
    spec_to_tokens,
    tokens_to_image,
    tokens_to_spec,
    unpatchify,
    unpatchify_spec,
)

__all__ = [name for name in dir() if not name.startswith("_")]
