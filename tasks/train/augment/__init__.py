"""Train-time augmentation on collated batches, the anchors' recipes at the built-in data's scale.

- images (ViT, DeiT/timm): random translation (replicate-pad, random crop back) and horizontal flips; colour
  jitter (brightness, contrast, saturation, as torchvision's ColorJitter), a TrivialAugment policy (Muller and Hutter
  2021: one op of RandAugment's, at a uniform random strength, per image), mixup and CutMix (Yun et al. 2019) with
  soft targets; the model adds label smoothing and stochastic depth (models/vit.py). Which are on: VIT_AUG and the ViT's
  entry in tasks/train/table.py. CLIP gets the translation only, since its captions name left and right;
- log-mels (AST, as in its Speech Commands recipe): a random gain per clip (the recording level) and a noise floor
  under some clips (the room and microphone), both on by default (AST_AUG); SpecAugment frequency and time masks (Park
  et al. 2019) and mixup (Zhang et al. 2018) with soft targets, which `F.cross_entropy` takes as class probabilities;
  random time and mel-axis shifts, a vocal-tract-length warp and a tempo stretch (speed_warp) are off: measured worse;
- the speech recogniser's log-mel source: the same gain and noise floor (on), the warp and stretch, and SpecAugment, as
  Park et al. introduced it for speech recognition (off by default, see ASR_AUG);
- ImageGPT's palette codes, on the built-in set (table `builtin_train`): each image's hues turned to a shuffled
  partner's (hue_swap, IMAGEGPT_AUG), so its one coloured thing meets every colour, held-out pairs included.

A run sets these with TrainConfig.augment: True the defaults below, a dict some of them (`settings`), False none.
Every draw comes from the training's own generators (models/rng.py `generator`), which the trainer checkpoints
(tasks/infra/checkpoint.py `rng_state`), so a resumed run augments exactly as the uninterrupted one. Text-to-image and
text-to-speech get no augmentation: their targets are what their text says (the speech recogniser's target is text,
so its spectrogram is augmented; ImageGPT's targets are its inputs, recoloured together). The trainer applies the
model's augmentation when `TrainConfig.augment` is on (the model table's `augment`).

Layout: image.py (the ViT's), audio.py (the AST's and the speech recogniser's), common.py (mixup, CutMix, settings);
this package re-exports them all.
"""

from tasks.train.augment.audio import (AST_AUG, ASR_AUG, FLOOR_DROP, asr_augment, ast_augment, band_limit,
                                       freq_shift, noise_floor, random_gain, slaney_hz, slaney_mel, spec_augment,
                                       speaker_and_room, speed_warp, time_shift, warp_mel)
from tasks.train.augment.common import cutmix, mix, mixup, settings
from tasks.train.augment.image import (IMAGEGPT_AUG, TRIVIAL_OPS, VIT_AUG, colour_jitter, dominant_hue,
                                       enhance_brightness, enhance_colour, enhance_contrast, grey, hue_swap, hues,
                                       imagegpt_augment, shift_flip, trivial_augment, vit_augment, with_hue)

# each model augmentation's settings
DEFAULTS = {vit_augment: VIT_AUG, ast_augment: AST_AUG, asr_augment: ASR_AUG, imagegpt_augment: IMAGEGPT_AUG}

__all__ = ["AST_AUG", "ASR_AUG", "DEFAULTS", "FLOOR_DROP", "IMAGEGPT_AUG", "TRIVIAL_OPS", "VIT_AUG", "asr_augment",
           "ast_augment", "band_limit", "colour_jitter", "cutmix", "dominant_hue", "enhance_brightness",
           "enhance_colour", "enhance_contrast", "freq_shift", "grey", "hue_swap", "hues", "imagegpt_augment", "mix",
           "mixup", "noise_floor", "random_gain", "settings", "shift_flip", "slaney_hz", "slaney_mel", "spec_augment",
           "speaker_and_room", "speed_warp", "time_shift", "trivial_augment", "vit_augment", "warp_mel", "with_hue"]
