"""Offline speech synthesis with espeak-ng (the ``espeakng-loader`` wheel ships ``libespeak-ng`` and its data).

:class:`EspeakSynth` loads the library with ctypes and initializes it once per process (espeak-ng keeps global
state, so every instance shares one handle and one lock). A *voice* is ``"<base>+<variant>"``: an English base
language (``en-us``, ``en`` (British), ``en-029`` (Caribbean), ``en-gb-scotland``, ...) combined with a voice
variant from ``voices/!v`` (``m1..m8``, ``f1..f5``, named ones). ``synth(text, voice, rate, pitch)`` returns a
mono float32 waveform in [-1, 1] at :attr:`EspeakSynth.sample_rate` (22050 Hz).

Determinism (measured with ``espeakng-loader`` 0.2.4): espeak-ng's output is *not* a pure function of
(text, voice, rate, pitch). Its noise generator is seeded by ``espeak_ng_SetRandSeed`` (we call it before every
clip), but the wave generator keeps static state across utterances (the pitch-flutter table index, the harmonic
table switch, the echo buffer), and ``espeak_Terminate`` / ``espeak_Initialize`` do not reset it. The same *sequence*
of requests from a fresh process, however, gives bit-identical audio. So :func:`synth_batch` renders a batch in a
fresh worker process (``fresh_process=True``, ~0.5 s to start): a dataset build is then bit-deterministic and does
not depend on what the calling process synthesized before. Repeated in-process :meth:`EspeakSynth.synth` calls of
the same request differ by pitch jitter only (same word and voice; lengths within ~0.5 %).
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import struct
import subprocess
import sys
import threading
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from unimoe.errors import UniMoEError

# English base languages (espeak-ng language identifiers), each with its own accent rules.
ENGLISH_BASES = ("en-us", "en", "en-029", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
                 "en-us-nyc")  # fmt: skip
# Voice variants (``voices/!v``): the speaker's formants, pitch range, roughness.
DEFAULT_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4")

_ESPEAK_RATE, _ESPEAK_VOLUME, _ESPEAK_PITCH, _ESPEAK_RANGE = 1, 2, 3, 4
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_ESPEAK_CHARS_UTF8 = 1
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class SpeechError(UniMoEError, RuntimeError):
    """espeak-ng cannot be loaded, a voice is unknown, or synthesis failed."""


@dataclass(frozen=True)
class SynthRequest:
    """One utterance: ``rate`` in words per minute (80–450), ``pitch`` / ``pitch_range`` in 0–100 (espeak-ng's
    defaults: 175, 50, 50), ``seed`` for espeak-ng's noise generator."""

    text: str
    voice: str = "en-us"
    rate: int = 175
    pitch: int = 50
    pitch_range: int = 50
    seed: int = 0

    def check(self) -> None:
        if not self.text.strip():
            raise SpeechError("synth: text is empty")
        if not 80 <= self.rate <= 450:
            raise SpeechError(f"synth: rate must be 80–450 words per minute, got {self.rate}")
        for name in ("pitch", "pitch_range"):
            if not 0 <= getattr(self, name) <= 100:
                raise SpeechError(f"synth: {name} must be in 0–100, got {getattr(self, name)}")


def default_paths() -> tuple[str, str]:
    """``(library, data)`` paths from the ``espeakng-loader`` wheel."""
    try:
        import espeakng_loader
    except ImportError as err:
        raise SpeechError(
            "speech synthesis needs the `espeakng-loader` wheel (pip install espeakng-loader, part of the `data` "
            "extra), which ships libespeak-ng and its data"
        ) from err
    return str(espeakng_loader.get_library_path()), str(espeakng_loader.get_data_path())


class _Espeak:
    """The process-wide library handle (espeak-ng is a singleton in C)."""

    def __init__(self, library_path: str | None, data_path: str | None):
        if library_path is None or data_path is None:
            default_lib, default_data = default_paths()
            library_path, data_path = library_path or default_lib, data_path or default_data
        self.library_path, self.data_path = str(library_path), str(data_path)
        try:
            lib = ctypes.CDLL(self.library_path)
        except OSError as err:
            raise SpeechError(f"cannot load libespeak-ng from {self.library_path}: {err}") from None
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetSynthCallback.argtypes = [_CALLBACK]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]  # fmt: skip
        self.set_seed = getattr(lib, "espeak_ng_SetRandSeed", None)  # espeak-ng >= 1.52
        if self.set_seed is not None:
            self.set_seed.argtypes = [ctypes.c_long]
            self.set_seed.restype = None
        if not Path(self.data_path, "phontab").is_file():
            raise SpeechError(f"{self.data_path} is not an espeak-ng-data directory (no phontab)")
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, self.data_path.encode(), 0)
        if rate <= 0:
            raise SpeechError(f"espeak_Initialize failed (returned {rate}) with data {self.data_path}")
        self.lib, self.sample_rate = lib, int(rate)
        self.chunks: list[np.ndarray] = []

        def collect(wav, n, events):  # int SynthCallback(short *wav, int numsamples, espeak_EVENT *events)
            if n > 0 and wav:
                self.chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
            return 0

        self._callback = _CALLBACK(collect)  # keep a reference: C holds only the pointer
        lib.espeak_SetSynthCallback(self._callback)
        self.lock = threading.Lock()
        self.current_voice: str | None = None


_HANDLE: _Espeak | None = None
_HANDLE_LOCK = threading.Lock()


def _handle(library_path: str | None = None, data_path: str | None = None) -> _Espeak:
    global _HANDLE
    with _HANDLE_LOCK:
        if _HANDLE is None:
            _HANDLE = _Espeak(library_path, data_path)
        elif data_path is not None and str(data_path) != _HANDLE.data_path:
            raise SpeechError(f"espeak-ng is already initialized with data {_HANDLE.data_path} in this process")
        return _HANDLE


class EspeakSynth:
    """espeak-ng text-to-speech. Cheap to construct: the library is loaded and initialized once per process.

    >>> wave, rate = EspeakSynth().synth("seven", voice="en-us+m3", rate=160, pitch=40)  # float32, 22050
    """

    def __init__(self, library_path: str | None = None, data_path: str | None = None):
        self._es = _handle(library_path, data_path)

    @property
    def sample_rate(self) -> int:
        return self._es.sample_rate

    @property
    def data_path(self) -> Path:
        return Path(self._es.data_path)

    def variant_names(self) -> list[str]:
        """Every voice variant file shipped with the data (``m1``, ``f3``, ``klatt``, ``whisper``, ...)."""
        folder = self.data_path / "voices" / "!v"
        return sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []

    def has_voice(self, voice: str) -> bool:
        with self._es.lock:
            ok = self._es.lib.espeak_SetVoiceByName(voice.encode()) == 0
            self._es.current_voice = voice if ok else None
        return ok

    def voices(self, bases: Iterable[str] = ENGLISH_BASES, variants: Iterable[str] = DEFAULT_VARIANTS) -> list[str]:
        """The usable ``base+variant`` voices (those espeak-ng accepts), in a stable order."""
        present = set(self.variant_names())
        variants = list(variants)
        return [f"{b}+{v}" for b in bases for v in variants if v in present and self.has_voice(f"{b}+{v}")]

    def synth(self, text: str, voice: str = "en-us", rate: int = 175, pitch: int = 50, pitch_range: int = 50,
              seed: int = 0) -> tuple[np.ndarray, int]:  # fmt: skip
        """Speak ``text`` → ``(float32 waveform in [-1, 1], sample_rate)``."""
        request = SynthRequest(text, voice, int(rate), int(pitch), int(pitch_range), int(seed))
        return self._synth_int16(request).astype(np.float32) / 32768.0, self.sample_rate

    def _synth_int16(self, r: SynthRequest) -> np.ndarray:
        r.check()
        es = self._es
        with es.lock:
            if es.current_voice != r.voice:
                if es.lib.espeak_SetVoiceByName(r.voice.encode()) != 0:
                    es.current_voice = None
                    known = ", ".join(self.variant_names()[:12])
                    raise SpeechError(f"espeak-ng has no voice {r.voice!r} (expected '<language>+<variant>', e.g. "
                                      f"'en-us+m3'; variants: {known}, ...)")  # fmt: skip
                es.current_voice = r.voice
            es.lib.espeak_SetParameter(_ESPEAK_RATE, r.rate, 0)
            es.lib.espeak_SetParameter(_ESPEAK_PITCH, r.pitch, 0)
            es.lib.espeak_SetParameter(_ESPEAK_RANGE, r.pitch_range, 0)
            es.lib.espeak_SetParameter(_ESPEAK_VOLUME, 100, 0)
            if es.set_seed is not None:
                es.set_seed(r.seed)
            es.chunks = []
            data = r.text.encode("utf-8")
            status = es.lib.espeak_Synth(data, len(data) + 1, 0, 0, 0, _ESPEAK_CHARS_UTF8, None, None)
            chunks, es.chunks = es.chunks, []
        if status != 0:
            raise SpeechError(f"espeak_Synth failed with status {status} for {r.text!r} ({r.voice})")
        return np.concatenate(chunks) if chunks else np.zeros(0, np.int16)


# -- batches in a fresh process ------------------------------------------------------------------------------------

# The worker imports ``unimoe.data.speech`` without running ``unimoe/__init__`` (which imports transformers, ~4 s):
# a bare package module whose ``__path__`` is the real package directory.
_BOOTSTRAP = """\
import sys, types
package = types.ModuleType("unimoe")
package.__path__ = [sys.argv[1]]
sys.modules["unimoe"] = package
from unimoe.data.speech import _worker_main
_worker_main(sys.argv[2], sys.argv[3])
"""


def _worker_main(library_path: str, data_path: str) -> None:
    """Read a JSON list of requests from stdin; write ``<int32 n><n int16 samples>`` per request to stdout."""
    synth = EspeakSynth(library_path, data_path)
    requests = json.loads(sys.stdin.buffer.read())
    out = sys.stdout.buffer
    for item in requests:
        try:
            wave = synth._synth_int16(SynthRequest(**item))
        except SpeechError as err:
            message = str(err).encode()
            out.write(struct.pack("<i", -len(message)) + message)
            break
        out.write(struct.pack("<i", wave.size) + wave.astype("<i2").tobytes())
    out.flush()


def _read_exact(stream, n: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise SpeechError("the espeak-ng worker process ended early")
    return data


def synth_batch(requests: Iterable[SynthRequest], *, fresh_process: bool = True, library_path: str | None = None,
                data_path: str | None = None) -> Iterator[np.ndarray]:  # fmt: skip
    """Render ``requests`` in order → float32 waveforms at :func:`sample_rate`. With ``fresh_process`` (default)
    they are rendered by a new worker process, so the samples are bit-identical from run to run (see the module
    docstring); otherwise by this process's espeak-ng."""
    requests = list(requests)
    for r in requests:
        r.check()
    if not fresh_process:
        synth = EspeakSynth(library_path, data_path)
        for r in requests:
            yield synth._synth_int16(r).astype(np.float32) / 32768.0
        return
    if library_path is None or data_path is None:
        default_lib, default_data = default_paths()
        library_path, data_path = library_path or default_lib, data_path or default_data
    package_dir = str(Path(__file__).resolve().parent.parent)
    proc = subprocess.Popen([sys.executable, "-c", _BOOTSTRAP, package_dir, library_path, data_path],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        # the worker reads all of stdin before it writes, so this cannot deadlock
        proc.stdin.write(json.dumps([asdict(r) for r in requests]).encode())
        proc.stdin.close()
        for _ in requests:
            (n,) = struct.unpack("<i", _read_exact(proc.stdout, 4))
            if n < 0:
                raise SpeechError(_read_exact(proc.stdout, -n).decode())
            yield np.frombuffer(_read_exact(proc.stdout, 2 * n), dtype="<i2").astype(np.float32) / 32768.0
    except SpeechError as err:
        proc.kill()
        stderr = proc.stderr.read().decode(errors="replace").strip()
        raise SpeechError(f"{err}{': ' + stderr.splitlines()[-1] if stderr else ''}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def sample_rate() -> int:
    """espeak-ng's output rate (22050 Hz)."""
    return EspeakSynth().sample_rate


@functools.lru_cache(maxsize=8)
def _resample_filter(up: int, down: int) -> np.ndarray:
    from scipy.signal import firwin

    half = 10 * max(up, down)  # scipy.signal.resample_poly's default Kaiser(5.0) low-pass, designed once
    return firwin(2 * half + 1, 1.0 / max(up, down), window=("kaiser", 5.0))


def resample(wave: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """Polyphase resampling (``scipy.signal.resample_poly`` with a cached filter: ~0.6 ms for 1 s of audio, ~100×
    faster than ``torchaudio.functional.resample`` for 22050 → 16000 Hz, which redesigns its kernel every call)."""
    if orig_rate == new_rate:
        return wave.astype(np.float32, copy=False)
    from scipy.signal import resample_poly

    g = math.gcd(int(orig_rate), int(new_rate))
    up, down = int(new_rate) // g, int(orig_rate) // g
    return resample_poly(wave, up, down, window=_resample_filter(up, down)).astype(np.float32)


def trim_silence(wave: np.ndarray, threshold: float = 0.01, pad: int = 0) -> np.ndarray:
    """Cut leading / trailing samples below ``threshold`` (espeak-ng adds ~0.1–0.3 s of silence at the end)."""
    loud = np.flatnonzero(np.abs(wave) > threshold)
    if loud.size == 0:
        return wave
    return wave[max(0, loud[0] - pad) : loud[-1] + 1 + pad]
