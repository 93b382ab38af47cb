"""The speech-mixture data pipeline (sepfx.data).

Everything here runs on the committed assets; the tests that synthesise speech are skipped
when the espeak-ng program is missing.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sepfx import data
from sepfx.errors import InputError

needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="espeak-ng is not installed"
)


def tone(frequency: float, sample_rate: int, seconds: float = 1.0) -> np.ndarray:
    return np.sin(2 * np.pi * frequency * np.arange(int(seconds * sample_rate)) / sample_rate)


def level_db(x: np.ndarray) -> float:
    """RMS of ``x`` relative to a full-scale sine, in dB (edges skipped: filter transients)."""
    x = np.asarray(x, dtype=np.float64)[200:-200]
    return 10 * math.log10(np.mean(x**2) / 0.5 + 1e-30)


def peak_frequency(x: np.ndarray, sample_rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sample_rate)[spectrum.argmax()])


def check_folder(folder: Path) -> dict:
    """Check every mixture of a make_mixtures folder: mix == s1 + s2 in the int16 samples, and
    the SNR of s1 over s2 is the index's snr_db (within 0.1 dB) and lies in [-5, 5]."""
    index = json.loads((folder / "index.json").read_text(encoding="utf-8"))
    assert index["items"], "empty index"
    for item in index["items"]:
        audio = {}
        for key, path in item["files"].items():
            samples, rate = data.read_wav(folder / path)
            assert rate == item["sample_rate"] == index["params"]["sample_rate"]
            assert len(samples) == item["samples"]
            audio[key] = samples.astype(np.int64)
        # The generator makes this exact; "within int16 rounding" is the promise.
        assert np.abs(audio["mix"] - audio["s1"] - audio["s2"]).max() <= 1, item["files"]
        p1, p2 = (float(np.mean(audio[k].astype(np.float64) ** 2)) for k in ("s1", "s2"))
        measured = 10 * math.log10(p1 / p2)
        assert abs(measured - item["snr_db"]) < 0.1, (
            item["files"]["mix"],
            measured,
            item["snr_db"],
        )
        assert -5.0 <= item["snr_db"] <= 5.0
        assert len(item["voices"]) == len(item["texts"]) == 2
        assert item["voices"][0] != item["voices"][1]  # two different speakers
    return index


def texts_by_split(index: dict) -> dict[str, set]:
    found: dict[str, set] = {split: set() for split in data.SPLITS}
    for item in index["items"]:
        for texts in item["texts"]:
            found[item["split"]].update(texts)
    return found


# ----------------------------------------------------------------------------- resampler


@pytest.mark.parametrize("target", [8000, 16000])
def test_resampler_keeps_a_1khz_tone(target):
    out = data.resample(tone(1000, 22050), 22050, target)
    assert out.dtype == np.float32
    assert len(out) == math.ceil(22050 * target / 22050)
    assert peak_frequency(out, target) == pytest.approx(1000, abs=2)
    assert abs(level_db(out)) < 0.01  # pass band: no gain change


def test_resampler_removes_what_would_alias():
    # 5 kHz is above the 4 kHz Nyquist frequency of 8 kHz audio: without a low-pass it would
    # fold onto 3 kHz at full level.
    out = data.resample(tone(5000, 22050), 22050, 8000)
    assert level_db(out) < -60
    # 3.3 kHz is in the pass band, 3.9 kHz in the stop band (the cut-off is at 3.6 kHz).
    assert abs(level_db(data.resample(tone(3300, 22050), 22050, 8000))) < 0.05
    assert level_db(data.resample(tone(3900, 22050), 22050, 8000)) < -60


def test_resampler_matches_direct_sinc_interpolation():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(500)
    out = data.resample(x, 16000, 8000)
    # Direct evaluation of the same windowed-sinc interpolation at a few output positions.
    cutoff, half = 0.5 * 0.9 * 0.5, math.ceil(32 / (2 * 0.5 * 0.9 * 0.5))
    for m in (0, 7, 100, 249):
        j = np.arange(2 * m - half + 1, 2 * m + half + 1)
        t = 2 * m - j
        h = 2 * cutoff * np.sinc(2 * cutoff * t) * data._kaiser(t.astype(float), half, 8.6)
        inside = (j >= 0) & (j < len(x))
        expected = (x[j[inside]] * h[inside]).sum() / h.sum()
        assert out[m] == pytest.approx(expected, abs=1e-5)


def test_resampler_identity_and_errors():
    x = np.linspace(-1, 1, 100)
    np.testing.assert_array_equal(data.resample(x, 8000, 8000), x.astype(np.float32))
    with pytest.raises(InputError):
        data.resample(np.zeros((2, 10)), 16000, 8000)
    with pytest.raises(InputError):
        data.resample(x, 0, 8000)


# ----------------------------------------------------------------------------- sentences


def test_sentence_splits_are_disjoint_and_fixed():
    rng = np.random.default_rng(0)
    drawn = {split: set() for split in data.SPLITS}
    for split in data.SPLITS:
        for language in ("en", "fr", "de"):
            for _ in range(200):
                drawn[split].add(data._sentence(rng, language, split, set()))
    for split, texts in drawn.items():
        assert all(data.sentence_split(text) == split for text in texts)
    assert not drawn["train"] & drawn["valid"]
    assert not drawn["train"] & drawn["test"]
    assert not drawn["valid"] & drawn["test"]
    # The split of a sentence depends on its text only (not on any seed).
    assert data.sentence_split(
        "The pilot found a red bicycle this morning."
    ) == data.sentence_split("The pilot found a red bicycle this morning.")


def test_every_language_has_a_word_list():
    for language, words in data.LANGUAGES.items():
        assert words in data._WORDS, language
    assert set(data.DEFAULT_LANGUAGES) <= set(data.LANGUAGES)


# ----------------------------------------------------------------------------- committed split


def test_bundled_test_set_loads():
    dataset = data.bundled_test_set()
    assert len(dataset) == 20
    mixture, sources = dataset[0]
    assert mixture.dtype == sources.dtype == torch.float32
    assert mixture.shape == (16000,) and sources.shape == (2, 16000)
    # Exact in float32 too: the int16 mixture is the integer sum of the int16 sources.
    assert torch.equal(mixture, sources.sum(0))
    assert mixture.abs().max() < 1.0 and sources.abs().amax(dim=1).min() > 0.01


def test_bundled_split_sums_snr_and_texts():
    index = check_folder(data.BUNDLED_MIXTURES)
    assert index["params"]["sample_rate"] == 8000 and index["params"]["seconds"] == 2.0
    for texts in texts_by_split(index).values():
        assert all(data.sentence_split(text) == "test" for text in texts)


def test_bundled_files_are_small():
    files = [p for p in data.ASSETS.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files if "checkpoints" not in p.parts)
    # mixtures 1.9 MB, real voices 0.9 MB (arctic and voices)
    assert size < 3.0e6, f"sepfx/assets data is {size / 1e6:.2f} MB"
    for p in files:  # trained baselines: a few MB at most each
        if "checkpoints" in p.parts:
            assert p.stat().st_size < 5e6, f"{p} is {p.stat().st_size / 1e6:.2f} MB"


def test_default_dataloader_collates():
    batches = list(data.loader(data.BUNDLED_MIXTURES, "test", batch_size=8))
    assert [b[0].shape[0] for b in batches] == [8, 8, 4]  # test split: in order, none dropped
    mixture, sources = batches[0]
    assert mixture.shape == (8, 16000) and sources.shape == (8, 2, 16000)
    assert mixture.dtype == sources.dtype == torch.float32


def test_segments_are_reproducible_crops():
    full = data.bundled_test_set()
    first = data.MixtureDataset(data.BUNDLED_MIXTURES, "test", segment=0.5, seed=3)
    again = data.MixtureDataset(data.BUNDLED_MIXTURES, "test", segment=0.5, seed=3)
    mixture, sources = first[5]
    assert mixture.shape == (4000,) and sources.shape == (2, 4000)
    assert torch.equal(mixture, again[5][0]) and torch.equal(sources, again[5][1])
    # The crop is a window of the full item, the same window for mixture and sources.
    whole, whole_sources = full[5]
    starts = [s for s in range(16000 - 4000 + 1) if torch.equal(whole[s : s + 4000], mixture)]
    assert starts and torch.equal(whole_sources[:, starts[0] : starts[0] + 4000], sources)
    first.set_epoch(1)
    assert not torch.equal(first[5][0], mixture)
    # Longer than the item: zero-padded at the end.
    padded = data.MixtureDataset(data.BUNDLED_MIXTURES, "test", segment=2.5)[5][0]
    assert padded.shape == (20000,) and torch.equal(padded[:16000], whole)
    assert not padded[16000:].any()


def test_shuffled_loader_is_seeded():
    def order(seed):
        batches = data.loader(data.BUNDLED_MIXTURES, "test", batch_size=4, shuffle=True, seed=seed)
        return torch.cat([b[0][:, :50] for b in batches])

    assert torch.equal(order(1), order(1))
    assert not torch.equal(order(1), order(2))


def test_dataset_errors_say_what_to_do(tmp_path):
    with pytest.raises(InputError, match="make_mixtures"):
        data.MixtureDataset(tmp_path, "train")
    with pytest.raises(InputError, match="no mixtures"):
        data.MixtureDataset(data.BUNDLED_MIXTURES, "train")
    with pytest.raises(InputError, match="split must be"):
        data.MixtureDataset(data.BUNDLED_MIXTURES, "dev")


def test_resampling_on_load_keeps_the_sum():
    mixture, sources = data.bundled_test_set(sample_rate=16000)[0]
    assert mixture.shape == (32000,) and sources.shape == (2, 32000)
    torch.testing.assert_close(mixture, sources.sum(0), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- real voices


def test_arctic_mixture():
    mixture, sources = data.arctic_mixture()
    assert mixture.dtype == sources.dtype == torch.float32
    # a0007 is 4.0 s, a0009 3.095 s at 16 kHz: cut to the shorter, at 8 kHz.
    assert mixture.shape == (24760,) and sources.shape == (2, 24760)
    assert torch.equal(mixture, sources.sum(0))
    power = sources.double().pow(2).mean(dim=1)
    assert 10 * math.log10(power[0] / power[1]) == pytest.approx(0.0, abs=0.01)
    assert mixture.abs().max() <= 0.9 + 1e-6
    assert (data.ARCTIC / "LICENSE").exists() and (data.ARCTIC / "ATTRIBUTION.md").exists()


def test_real_voice_set():
    voices = data.real_voices()
    assert len({v["speaker"] for v in voices}) >= 4 and len(voices) >= 10
    attribution = (data.VOICES / "ATTRIBUTION.md").read_text()
    for v in voices:
        assert v["licence"] and v["audio"].ndim == 1 and len(v["audio"]) > 8000
        if v["path"].parent == data.VOICES:  # each file's origin is stated next to it
            assert v["file"].split("_")[0] in attribution and v["source"] and v["sha256"]
    dataset = data.RealVoiceSet()
    assert len(dataset) >= 20
    used = {v["file"] for a, b, _ in dataset.items for v in (a, b)}
    assert used == {v["file"] for v in voices}
    for i in range(len(dataset)):
        a, b, snr_db = dataset.items[i]
        assert a["speaker"] != b["speaker"] and -2.5 <= snr_db <= 2.5
        mixture, sources = dataset[i]
        assert sources.shape == (2, mixture.shape[0]) and mixture.shape[0] <= 4 * 8000
        assert torch.equal(mixture, sources.sum(0))
        power = sources.double().pow(2).mean(dim=1)
        assert 10 * math.log10(power[0] / power[1]) == pytest.approx(snr_db, abs=0.01)
    # fixed: the same draw every time
    again = data.RealVoiceSet()
    assert [dataset.describe(i) for i in range(len(dataset))] == [
        again.describe(i) for i in range(len(again))
    ]
    assert torch.equal(again[3][1], dataset[3][1])


# ----------------------------------------------------------------------------- espeak-ng


def test_missing_espeak_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(data.shutil, "which", lambda name: None)
    with pytest.raises(InputError, match="apt-get install espeak-ng"):
        data.synthesize("Hello there.", "en")


@needs_espeak
def test_synthesize():
    audio = data.synthesize("The pilot found a red bicycle this morning.", "en-us+f3", 50, 160)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert 0.8 * 8000 < len(audio) < 5 * 8000
    # Trimmed: speech starts and ends within the 20 ms margin.
    assert np.abs(audio[:400]).max() > 1e-3 and np.abs(audio[-400:]).max() > 1e-3
    wide = data.synthesize(
        "The pilot found a red bicycle this morning.", "en-us+f3", 50, 160, sample_rate=16000
    )
    assert abs(len(wide) - 2 * len(audio)) < 0.05 * len(wide)
    with pytest.raises(InputError, match="voice"):
        data.synthesize("Hello.", "xx")


@needs_espeak
def test_generation_is_deterministic_and_checks_out(tmp_path):
    kwargs = dict(n_train=3, n_valid=2, n_test=2, seed=7, seconds=1.5, progress=False)
    first = data.make_mixtures(tmp_path / "a", **kwargs)
    second = data.make_mixtures(tmp_path / "b", **kwargs, workers=1)
    names = sorted(p.relative_to(first).as_posix() for p in first.rglob("*") if p.is_file())
    assert names == sorted(
        p.relative_to(second).as_posix() for p in second.rglob("*") if p.is_file()
    )
    assert len(names) == 1 + 3 * 7
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name

    index = check_folder(first)
    found = texts_by_split(index)
    assert not found["train"] & found["valid"] and not found["train"] & found["test"]
    assert not found["valid"] & found["test"]
    assert [item["split"] for item in index["items"]] == ["train"] * 3 + ["valid"] * 2 + [
        "test"
    ] * 2

    # Same parameters: nothing is rewritten. Other parameters: regenerated, old files removed.
    stamp = (first / "index.json").stat().st_mtime_ns
    data.make_mixtures(first, **kwargs)
    assert (first / "index.json").stat().st_mtime_ns == stamp
    data.make_mixtures(first, **{**kwargs, "n_train": 1, "seed": 8})
    assert sorted(p.name for p in (first / "train").iterdir()) == [
        "00000_mix.wav",
        "00000_s1.wav",
        "00000_s2.wav",
    ]
    assert json.loads((first / "index.json").read_text())["params"]["seed"] == 8
    batch = next(iter(data.loader(first, "train", batch_size=1, segment=1.0)))
    assert batch[0].shape == (1, 8000) and batch[1].shape == (1, 2, 8000)


def test_generation_rejects_bad_arguments(tmp_path):
    with pytest.raises(InputError, match="word list"):
        data.make_mixtures(tmp_path, 1, 0, 0, languages=("xx",), progress=False)
    with pytest.raises(InputError, match="counts"):
        data.make_mixtures(tmp_path, 0, 0, 0, progress=False)


# ----------------------------------------------------------------------------- varied data

needs_other_synthesisers = pytest.mark.skipif(
    shutil.which("flite") is None or shutil.which("text2wave") is None,
    reason="flite or festival is not installed",
)


def test_augment_records_a_speaker_in_a_room(monkeypatch):
    """The speaker warp stretches by its factor, the noise floor lies at its drawn SNR, the
    channel removes energy outside its band, and the room adds a reverberant tail."""
    sample_rate = 8000
    t = np.arange(2 * sample_rate) / sample_rate
    tone = np.sin(2 * np.pi * 1000 * t) + np.sin(2 * np.pi * 40 * t)
    for seed in range(12):
        rng = np.random.default_rng(seed)
        audio, recording = data._augment(rng, tone, sample_rate)
        warp = recording["warp"]
        assert 0.88 <= warp <= 1.12
        if "rt60_s" not in recording:
            assert abs(len(audio) - len(tone) * warp) <= 2, (recording, len(audio))
        else:
            assert 0.15 <= recording["rt60_s"] <= 0.6
            assert len(audio) > len(tone) * warp + 0.05 * sample_rate  # the tail
        if "band_hz" in recording and "rt60_s" not in recording:
            low = peak_frequency(audio, sample_rate)  # 40 Hz is cut, 1000/warp Hz kept
            assert abs(low - 1000 / warp) < 10, (low, recording)
        if recording["noise_snr_db"] is not None:
            noise = data._noise_floor(rng, audio, sample_rate, recording)
            snr = 10 * math.log10(np.mean(audio**2) / np.mean(noise**2))
            assert abs(snr - recording["noise_snr_db"]) < 1e-6
    assert data.make_mixtures.__kwdefaults__["augment"] is False


def test_unknown_synthesiser_voices_are_clear_errors():
    with pytest.raises(InputError, match="engines"):
        data.make_mixtures("unused", 1, 0, 0, engines=("espeak", "sam"), progress=False)
    with pytest.raises(InputError, match="unknown synthesiser"):
        data.synthesize("Hello.", "sam:robot")


@needs_other_synthesisers
def test_flite_and_festival_voices_speak():
    for voice in [f"flite:{v}" for v in data.FLITE_VOICES] + [
        f"festival:{v}" for v in data.FESTIVAL_VOICES
    ]:
        audio = data.synthesize("The pilot found a red bicycle.", voice, 50, 175)
        assert audio.dtype == np.float32 and 0.8 * 8000 < len(audio) < 5 * 8000, voice
        slow = data.synthesize("The pilot found a red bicycle.", voice, 50, 120)
        assert len(slow) > 1.15 * len(audio), voice  # speed is honoured
    with pytest.raises(InputError, match="no voice"):
        data.synthesize("Hello.", "flite:nobody")
    with pytest.raises(InputError, match="voice_nobody"):
        data.synthesize("Hello.", "festival:nobody")


@needs_espeak
@needs_other_synthesisers
def test_varied_mixtures_check_out(tmp_path):
    kwargs = dict(n_train=6, n_valid=1, n_test=1, seed=5, seconds=1.5, progress=False, augment=True)
    kwargs["engines"] = data.ENGINES
    first = data.make_mixtures(tmp_path / "a", **kwargs)
    index = check_folder(first)
    assert index["params"]["engines"] == list(data.ENGINES) and index["params"]["augment"]
    voices = [v for item in index["items"] for v in item["voices"]]
    assert {v.split(":")[0] for v in voices if ":" in v} <= {"flite", "festival"}
    for item in index["items"]:
        assert len(item["recordings"]) == 2 and all("warp" in r for r in item["recordings"])
    # The real-voice set's CMU ARCTIC speakers (flite's awb and slt) are never spoken.
    assert not {"flite:awb", "flite:slt"} & set(voices)
    second = data.make_mixtures(tmp_path / "b", **kwargs, workers=1)
    for item in index["items"]:
        for path in item["files"].values():
            assert (first / path).read_bytes() == (second / path).read_bytes(), path
