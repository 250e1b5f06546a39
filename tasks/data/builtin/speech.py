"""Text to speech with eSpeak NG through its C API (ctypes), from the `espeakng-loader` wheel; no system package.

    synthesize("a red circle", voice="en+f3", rate=160, pitch=60)  ->  float32 mono waveform, shape (n_samples,)

eSpeak NG synthesises at `ESPEAK_SAMPLE_RATE` (22050 Hz); `synthesize` resamples to the rate asked for with
torchaudio's sinc kernel (see `resample`).

Determinism. The engine keeps state in C statics that no API call resets (the pitch-flutter index, the wave phase,
the echo buffer, ...), and neither espeak_Terminate nor espeak_Initialize clears them: in one process, the same
utterance spoken twice gives different samples (and lengths). `espeak_ng_SetRandSeed` does not help. So each
utterance runs on a fresh engine: load the library, initialise, speak, terminate, unload (dlclose). Unloading only
resets the statics if nobody else holds the library, so this module loads its own private copy of the .so (copied
once per process into a temp folder). The cost is 1-4 ms per utterance. The library is process-global and not
thread-safe; every call holds `_LOCK`. Variants with breath noise (en+f2, en+f3, ...) still vary: see VOICES.
"""

from __future__ import annotations

import _ctypes
import atexit
import ctypes
import functools
import math
import os
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

SAMPLE_RATE = 16000  # default output rate (Hz)
ESPEAK_SAMPLE_RATE = 22050  # what the engine produces (Hz); checked against espeak_Initialize's answer

# Voices that load with the wheel's data and give the same samples whatever ran before them: a language ("en",
# "en-us", "en-gb-scotland") optionally with a variant ("+f1" female, "+m3" male, ...) from espeak-ng-data/voices/!v.
# Four male, four female; all distinct on the same text. Variants with a `breath` setting (f2, f3, f5, whisper, ...)
# are left out: in this eSpeak NG build (1.52) their output depends on uninitialised memory (it changed with the
# process history and with MALLOC_PERTURB_), so they are not reproducible.
VOICES = ("en", "en-us", "en-gb-scotland", "en+m3", "en+f1", "en+f4", "en-us+f4", "en+linda")
RATE_RANGE = (80, 450)  # espeakRATE, words per minute (the engine clamps to about this range)
PITCH_RANGE = (0, 100)  # espeakPITCH; 50 is the voice's own

# Constants from espeak-ng/speak_lib.h.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_ESPEAK_CHARS_AUTO = 0
_ESPEAK_RATE = 1
_ESPEAK_PITCH = 3
_EE_OK = 0
_EE_ERRORS = {-1: "EE_INTERNAL_ERROR", 1: "EE_BUFFER_FULL", 2: "EE_NOT_FOUND"}

# int callback(short *wav, int numsamples, espeak_EVENT *events); the events are not read, so a void pointer.
_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

_LOCK = threading.Lock()
_chunks: list[np.ndarray] = []  # int16 blocks of the utterance in progress (touched only under _LOCK)


def _on_samples(wav, numsamples, events) -> int:
    if wav and numsamples > 0:
        _chunks.append(np.ctypeslib.as_array(wav, shape=(numsamples,)).astype(np.int16, copy=True))
    return 0  # 0: continue synthesis


_CALLBACK = _SynthCallback(_on_samples)  # module-level: the C side keeps a pointer to it


@functools.cache
def _paths() -> tuple[str, bytes]:
    """(private copy of the shared library, data folder as bytes), resolved once per process."""
    try:
        import espeakng_loader
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise RuntimeError("speech synthesis needs the espeakng-loader package (pip install espeakng-loader)") from e
    src = Path(espeakng_loader.get_library_path())
    data = Path(espeakng_loader.get_data_path())
    if not src.is_file() or not data.is_dir():
        raise RuntimeError(f"eSpeak NG files missing: library {src}, data {data}")
    private = Path(tempfile.mkdtemp(prefix="tessera-espeak-"))
    atexit.register(_remove_if_owner, private, os.getpid())
    lib = private / src.name
    shutil.copyfile(src, lib)
    return str(lib), os.fsencode(data)


def _remove_if_owner(folder: Path, owner_pid: int) -> None:
    if os.getpid() == owner_pid:  # a forked child exiting must not delete the copy its parent still loads
        shutil.rmtree(folder, ignore_errors=True)


def _load() -> ctypes.CDLL:
    """A freshly loaded, initialised engine with its prototypes declared (call with `_LOCK` held)."""
    lib_path, data_path = _paths()
    if not os.path.exists(lib_path):  # the temp copy was cleaned away under us: copy again
        _paths.cache_clear()
        lib_path, data_path = _paths()
    try:
        lib = ctypes.CDLL(lib_path)
    except OSError as e:
        raise RuntimeError(f"cannot load eSpeak NG from {lib_path}: {e}") from e
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
    lib.espeak_SetSynthCallback.restype = None
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetVoiceByName.restype = ctypes.c_int
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_SetParameter.restype = ctypes.c_int
    lib.espeak_Synth.argtypes = [
        ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
        ctypes.POINTER(ctypes.c_uint), ctypes.c_void_p,
    ]  # text, size, position, position_type, end_position, flags, unique_identifier, user_data
    lib.espeak_Synth.restype = ctypes.c_int
    lib.espeak_Synchronize.restype = ctypes.c_int
    lib.espeak_Terminate.restype = ctypes.c_int

    rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path, 0)
    if rate != ESPEAK_SAMPLE_RATE:
        _unload(lib, terminate=rate > 0)
        if rate <= 0:
            raise RuntimeError(f"eSpeak NG espeak_Initialize failed ({rate}) with data path {data_path.decode()!r}")
        raise RuntimeError(f"eSpeak NG runs at {rate} Hz; this module expects {ESPEAK_SAMPLE_RATE} Hz")
    lib.espeak_SetSynthCallback(_CALLBACK)
    return lib


def _unload(lib: ctypes.CDLL, terminate: bool = True) -> None:
    if terminate:
        lib.espeak_Terminate()
    _ctypes.dlclose(lib._handle)


def _check(name: str, code: int) -> None:
    if code != _EE_OK:
        raise RuntimeError(f"eSpeak NG {name} failed with {_EE_ERRORS.get(code, code)}")


@functools.cache
def _variants() -> frozenset[str]:
    """Voice variant names ("f3", "m3", "klatt", ...) in the data folder; eSpeak silently ignores unknown ones."""
    return frozenset(p.name for p in (Path(os.fsdecode(_paths()[1])) / "voices" / "!v").iterdir())


def synthesize_raw(text: str, voice: str = "en", rate: int = 175, pitch: int = 50) -> np.ndarray:
    """int16 samples at ESPEAK_SAMPLE_RATE, shape (n_samples,), as the engine produced them (silence included)."""
    if not text.strip():
        raise ValueError("synthesize: empty text")
    if not (RATE_RANGE[0] <= rate <= RATE_RANGE[1]):
        raise ValueError(f"synthesize: rate {rate} outside {RATE_RANGE} words per minute")
    if not (PITCH_RANGE[0] <= pitch <= PITCH_RANGE[1]):
        raise ValueError(f"synthesize: pitch {pitch} outside {PITCH_RANGE}")
    data = text.encode("utf-8")
    with _LOCK:
        _, _, variant = voice.partition("+")
        if variant and variant not in _variants():
            raise RuntimeError(f"eSpeak NG has no voice variant {variant!r} (in {voice!r}); try one of {VOICES}")
        lib = _load()
        try:
            code = lib.espeak_SetVoiceByName(voice.encode())
            if code != _EE_OK:
                why = _EE_ERRORS.get(code, code)
                raise RuntimeError(f"eSpeak NG has no voice {voice!r} ({why}); try one of {VOICES}")
            _check("espeak_SetParameter(rate)", lib.espeak_SetParameter(_ESPEAK_RATE, int(rate), 0))
            _check("espeak_SetParameter(pitch)", lib.espeak_SetParameter(_ESPEAK_PITCH, int(pitch), 0))
            _chunks.clear()
            flags = _ESPEAK_CHARS_AUTO
            _check("espeak_Synth", lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, flags, None, None))
            _check("espeak_Synchronize", lib.espeak_Synchronize())
            return np.concatenate(_chunks) if _chunks else np.zeros(0, np.int16)
        finally:
            _chunks.clear()
            _unload(lib)


def trim_silence(wav: np.ndarray, threshold: float = 1e-3, pad: int = 0) -> np.ndarray:
    """Drop leading/trailing samples with |x| <= threshold, keeping up to `pad` samples either side. (n,) -> (m,)."""
    loud = np.flatnonzero(np.abs(wav) > threshold)
    if loud.size == 0:
        return wav[:0]
    return wav[max(0, loud[0] - pad) : loud[-1] + 1 + pad]


@functools.cache
def _sinc_kernel(orig_sr: int, new_sr: int) -> tuple[np.ndarray, int, int, int]:
    """torchaudio's windowed-sinc resampling kernel as (taps, new) float32, with (orig, new, width) reduced by gcd."""
    import torchaudio

    g = math.gcd(orig_sr, new_sr)
    r = torchaudio.transforms.Resample(orig_sr, new_sr)  # kernel: (new // g, 1, 2 * width + orig // g)
    return np.ascontiguousarray(r.kernel[:, 0, :].numpy().T), orig_sr // g, new_sr // g, int(r.width)


def resample(wav: np.ndarray, orig_sr: int, new_sr: int) -> np.ndarray:
    """torchaudio.functional.resample's sinc interpolation, in numpy. (n,) float32 -> (ceil(n * new_sr / orig_sr),).

    Same kernel and framing as torchaudio (outputs agree to 1e-5), but computed with a single-threaded einsum:
    on a busy 2-core machine the threaded conv1d of torch (or a BLAS matmul) on a short clip spends 10-40 ms
    waiting for its threads, and a new input length costs a oneDNN primitive; this takes 1-4 ms.
    """
    if orig_sr == new_sr or wav.size == 0:
        return wav.astype(np.float32, copy=True)
    kernel, orig, new, width = _sinc_kernel(orig_sr, new_sr)
    padded = np.pad(wav.astype(np.float32, copy=False), (width, width + orig))
    frames = sliding_window_view(padded, kernel.shape[0])[::orig]  # (n_frames, taps), a strided view
    out = np.einsum("ft,tn->fn", frames, kernel, optimize=False).reshape(-1)  # (n_frames * new,)
    return out[: math.ceil(new * wav.size / orig)]


def synthesize(
    text: str,
    voice: str = "en",
    rate: int = 175,
    pitch: int = 50,
    sample_rate: int = SAMPLE_RATE,
    trim: bool = True,
) -> np.ndarray:
    """Speak `text`: float32 mono waveform in [-1, 1] at `sample_rate` Hz, shape (n_samples,).

    `voice` is an eSpeak NG voice name (see VOICES), `rate` words per minute (80..450), `pitch` 0..100. With `trim`,
    leading and trailing silence is cut to 20 ms either side. Same arguments, same samples (for the voices in
    VOICES; breath variants vary).
    """
    if sample_rate <= 0:
        raise ValueError(f"synthesize: sample_rate must be positive, got {sample_rate}")
    wav = synthesize_raw(text, voice, rate, pitch).astype(np.float32) / 32768.0  # (n,) at 22050 Hz
    if trim:
        wav = trim_silence(wav, threshold=1e-3, pad=ESPEAK_SAMPLE_RATE // 50)
    wav = resample(wav, ESPEAK_SAMPLE_RATE, sample_rate)  # (ceil(n * sample_rate / 22050),)
    return np.ascontiguousarray(np.clip(wav, -1.0, 1.0), dtype=np.float32)
