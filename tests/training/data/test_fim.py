"""Fill-in-the-middle documents: exact tokens for PSM and SPM (empty parts, multi-byte characters at the split
points), the measured FIM and SPM rates against 99% binomial intervals, uniform split points, determinism per
(seed, document id), special tokens never cut, and the config's field checks."""
import math
from collections import Counter

import pytest

from training import tokenizer as T
from training.config import ConfigError, resolve_stage_config
from training.data import fim

DOCS = 2_000 * 3      # ≥ 2,000 documents per measured rate (the floor), with room for the SPM share
CODE = "def add(a, b):\n    return a + b\n"


def encode(text: str) -> list[int]:
    return T.load_tokenizer().encode(text, add_special_tokens=False).ids


def decode(ids: list[int]) -> str:
    return T.load_tokenizer().decode(ids, skip_special_tokens=False)


BEGIN, HOLE, END, EOD = 128801, 128800, 128802, 1   # DeepSeek-V3's <｜fim▁begin｜>, <｜fim▁hole｜>, <｜fim▁end｜>, EOS


def test_sentinel_ids_are_deepseeks():
    assert [T.token_id(t) for t in (T.FIM_BEGIN, T.FIM_HOLE, T.FIM_END, T.EOD)] == [BEGIN, HOLE, END, EOD]


def test_psm_document_token_by_token():
    ids = fim.apply_plan(CODE, fim.FimPlan(T.PSM, 26, 31))
    # <｜fim▁begin｜> "def add(a, b):\n    return " <｜fim▁hole｜> "\n" <｜fim▁end｜> "a + b" <｜end▁of▁sentence｜>
    assert ids == [BEGIN, 3465, 1258, 6036, 14, 291, 3395, 361, 1354, 223, HOLE, 201, END, 67, 940, 291, EOD]
    assert decode(ids) == "<｜fim▁begin｜>def add(a, b):\n    return <｜fim▁hole｜>\n<｜fim▁end｜>a + b<｜end▁of▁sentence｜>"


def _psm(prefix, middle, suffix):
    return [BEGIN, *encode(prefix), HOLE, *encode(suffix), END, *encode(middle), EOD]


def _spm(prefix, middle, suffix):   # "variant 2": both sentinels first, then suffix, prefix, middle
    return [BEGIN, HOLE, *encode(suffix), END, *encode(prefix), *encode(middle), EOD]


CASES = [   # (text, start, end, prefix, middle, suffix), the parts written out by hand
    (CODE, 26, 31, "def add(a, b):\n    return ", "a + b", "\n"),
    (CODE, 0, 15, "", "def add(a, b):\n", "    return a + b\n"),                       # empty prefix
    (CODE, 15, 15, "def add(a, b):\n", "", "    return a + b\n"),                       # empty middle
    (CODE, 26, 32, "def add(a, b):\n    return ", "a + b\n", ""),                       # empty suffix
    (CODE, 0, 32, "", CODE, ""),                                                        # all middle
    (CODE, 32, 32, CODE, "", ""),                                                       # all prefix
    ("café 中文 🚀 ok", 3, 4, "caf", "é", " 中文 🚀 ok"),                                # around a 2-byte é
    ("café 中文 🚀 ok", 6, 7, "café 中", "文", " 🚀 ok"),                                # between 3-byte 中 and 文
    ("café 中文 🚀 ok", 8, 9, "café 中文 ", "🚀", " ok"),                                # around a 4-byte emoji
    ("café 中文 🚀 ok", 9, 9, "café 中文 🚀", "", " ok"),                                # empty middle after it
]


@pytest.mark.parametrize("mode, expected", [(T.PSM, _psm), (T.SPM, _spm)], ids=[T.PSM, T.SPM])
@pytest.mark.parametrize("text, start, end, prefix, middle, suffix", CASES, ids=[
    "middle", "empty-prefix", "empty-middle", "empty-suffix", "all-middle", "all-prefix", "e-acute", "cjk", "emoji",
    "after-emoji"])
def test_fim_documents_are_the_sentinels_around_separately_encoded_parts(text, start, end, prefix, middle, suffix,
                                                                          mode, expected):
    plan = fim.FimPlan(mode, start, end)
    assert plan.split(text) == (prefix, middle, suffix)
    ids = fim.apply_plan(text, plan)
    assert ids == expected(prefix, middle, suffix)
    assert ids == T.fim_document_ids(encode(prefix), encode(middle), encode(suffix), mode)
    assert decode(ids) == T.fim_document(prefix, middle, suffix, mode)   # the text round-trips, characters whole
    assert T.fim_document(prefix, middle, suffix, T.PSM) == f"{T.fim_psm(prefix, suffix)}{middle}{T.EOD}"


def test_every_split_of_multibyte_text_keeps_characters_whole():
    text = "é中🚀"   # 2, 3 and 4 UTF-8 bytes: code-point splits never cut one
    seen = set()
    for n in range(200):
        doc = fim.document_ids(text, f"doc-{n}", seed=3, rate=1.0, spm_rate=0.5)
        prefix, middle, suffix = doc.plan.split(text)
        seen.add((doc.plan.start, doc.plan.end))
        assert prefix + middle + suffix == text
        assert decode(doc.ids) == T.fim_document(prefix, middle, suffix, doc.mode)
    assert seen == {(i, j) for i in range(4) for j in range(i, 4)}   # every split, empty parts included


def test_the_plain_path_is_the_text_then_eod_and_reuses_the_callers_ids():
    doc = fim.document_ids(CODE, "a", rate=0.0)
    assert doc.mode == fim.NONE and doc.ids == [*encode(CODE), EOD]
    assert fim.document_ids(CODE, "a", plain_ids=[7, 8]).ids == [7, 8, EOD]
    assert fim.document_ids(CODE, "a", rate=1.0, plain_ids=[7, 8]).ids[0] == BEGIN   # FIM encodes the parts itself


# ------------------------------------------------------------------------------------------------- the rates --
def binomial_interval(n: int, p: float, confidence: float = 0.99) -> tuple[int, int]:
    """The central interval holding `confidence` of Binomial(n, p)."""
    try:
        from scipy.stats import binom
    except ImportError:   # normal approximation (n·p ≥ 200 here, so it is close): mean ± z·sd, z = 2.576 for 99%
        sd = math.sqrt(n * p * (1 - p))
        return math.floor(n * p - 2.576 * sd), math.ceil(n * p + 2.576 * sd)
    low, high = binom.interval(confidence, n, p)
    return int(low), int(high)


def _modes(rate, spm_rate, seed=0, docs=DOCS):
    return Counter(fim.plan(CODE, f"pkg/mod_{n}.py", seed=seed, rate=rate, spm_rate=spm_rate).mode
                   for n in range(docs))


@pytest.mark.parametrize("rate", [0.5, 0.1])
def test_measured_fim_rate_lies_in_the_99_percent_binomial_interval(rate):
    modes = _modes(rate, spm_rate=0.0)
    transformed = modes[T.PSM] + modes[T.SPM]
    low, high = binomial_interval(DOCS, rate)
    print(f"rate {rate}: {transformed}/{DOCS} = {transformed / DOCS:.4f}, 99% interval [{low}, {high}]")
    assert low <= transformed <= high
    assert modes[T.SPM] == 0   # DeepSeek's PSM-only setting


@pytest.mark.parametrize("rate, spm_rate", [(0.5, 0.5), (0.1, 0.5), (0.5, 0.1)])
def test_measured_spm_share_of_fim_documents_lies_in_its_99_percent_interval(rate, spm_rate):
    modes = _modes(rate, spm_rate)
    transformed = modes[T.PSM] + modes[T.SPM]
    low, high = binomial_interval(transformed, spm_rate)
    print(f"rate {rate}, spm_rate {spm_rate}: {modes[T.SPM]}/{transformed} SPM = {modes[T.SPM] / transformed:.4f}, "
          f"99% interval [{low}, {high}]")
    assert low <= modes[T.SPM] <= high
    low, high = binomial_interval(DOCS, rate)   # choosing SPM leaves the FIM rate as it was
    assert low <= transformed <= high


def test_rates_zero_and_one_are_exact_and_a_higher_rate_only_adds_documents():
    assert _modes(0.0, 1.0, docs=500) == {fim.NONE: 500}
    assert _modes(1.0, 0.0, docs=500) == {T.PSM: 500}
    assert _modes(1.0, 1.0, docs=500) == {T.SPM: 500}
    ids = [f"pkg/mod_{n}.py" for n in range(2000)]
    at = lambda rate: {i for i in ids if fim.plan(CODE, i, rate=rate).mode != fim.NONE}
    assert at(0.1) <= at(0.5)


def test_split_points_are_uniform_over_character_positions():
    """Two positions uniform over 0..n, sorted: P(start = end = k) = 1/(n+1)², P(start = a < end = b) = 2/(n+1)².
    A chi-square test over every (start, end) pair of a 9-character text."""
    scipy_stats = pytest.importorskip("scipy.stats")
    text, draws = "abcdefghi", 20_000
    positions = len(text) + 1
    counts = Counter((p.start, p.end) for p in (fim.plan(text, f"d{n}", seed=5, rate=1.0) for n in range(draws)))
    pairs = [(a, b) for a in range(positions) for b in range(a, positions)]
    assert set(counts) == set(pairs)
    expected = [draws * (1 if a == b else 2) / positions ** 2 for a, b in pairs]
    assert scipy_stats.chisquare([counts[p] for p in pairs], expected).pvalue > 0.001


# --------------------------------------------------------------------------------------------- determinism --
def test_same_seed_and_id_give_the_same_document_and_another_seed_other_splits():
    text = CODE * 20
    first = [fim.document_ids(text, f"f{n}", seed=1, rate=1.0, spm_rate=0.5) for n in range(100)]
    again = [fim.document_ids(text, f"f{n}", seed=1, rate=1.0, spm_rate=0.5) for n in reversed(range(100))][::-1]
    assert first == again   # a pure function of (seed, id): order and process do not matter
    other = [fim.plan(text, f"f{n}", seed=2, rate=1.0, spm_rate=0.5) for n in range(100)]
    moved = sum((a.plan.start, a.plan.end) != (b.start, b.end) for a, b in zip(first, other))
    assert moved >= 98
    assert fim.plan(text, "f0", seed=1, rate=1.0) != fim.plan(text, "f1", seed=1, rate=1.0)


def test_special_token_text_is_never_cut():
    """A repository sample's markers stay whole: no split point falls strictly inside one."""
    text = f"{T.REPO_NAME_BEGIN}r{T.REPO_NAME_END}{T.FILE_NAME_BEGIN}a.py{T.FILE_NAME_END}{T.FILE_BEGIN}x = 1\n"
    markers = sum(i in T.control_token_ids() for i in encode(text))
    inside = {m.start() + k for m in fim._SPECIAL.finditer(text) for k in range(1, len(m.group()))}
    for n in range(300):
        doc = fim.document_ids(text, f"r{n}", rate=1.0, spm_rate=0.5)
        assert doc.plan.start not in inside and doc.plan.end not in inside
        assert sum(i in T.control_token_ids() for i in doc.ids) == markers + 4   # + 3 sentinels + EOD


def test_position_skips_the_protected_ranges():
    holes = [(2, 5), (7, 9)]   # positions 2-4 and 7-8 are inside markers
    assert [fim._position(k, holes) for k in range(6)] == [0, 1, 5, 6, 9, 10]


def test_out_of_range_rates_and_unknown_modes_are_refused():
    with pytest.raises(ValueError, match="rate and spm_rate must lie in"):
        fim.plan(CODE, "x", rate=1.5)
    with pytest.raises(ValueError, match="FIM mode must be one of"):
        T.fim_document_ids([], [], [], "pms")


# -------------------------------------------------------------------------------------------------- config --
def test_config_fim_fields_are_checked_naming_the_field():
    with pytest.raises(ConfigError, match=r"sources\.0\.fim\.rate: Input should be less than or equal to 1"):
        resolve_stage_config("curate", overrides=["sources=[{kind: package_code, fim: {rate: 1.5}}]"])
    with pytest.raises(ConfigError, match=r"sources\.0\.fim\.spm_rate: Input should be greater than or equal to 0"):
        resolve_stage_config("curate", overrides=["sources=[{kind: package_code, fim: {rate: 0.5, spm_rate: -1}}]"])
    with pytest.raises(ConfigError, match=r"sources\.0: fim\.rate: fill-in-the-middle applies to code sources"):
        resolve_stage_config("curate", overrides=["sources=[{kind: package_metadata, fim: {rate: 0.1}}]"])


def test_presets_set_the_papers_rates():
    v3 = {s.kind: s.fim for s in resolve_stage_config("curate", "deepseek-v3").sources}
    assert (v3["package_code"].rate, v3["package_code"].spm_rate) == (0.1, 0.0)   # V3 §4.1: 0.1, PSM
    assert v3["package_metadata"].rate == 0.0
    assert all(s.fim.rate == 0.0 for s in resolve_stage_config("curate", "tiny").sources)   # the tiny corpus is as was
