"""The sampler against Hugging Face's logits processors, OpenAI's penalty formula and torch.log_softmax."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from other_build import rerun_under_x86_64_v3, use_requested_build
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from pagoda import cpu_extension
from pagoda.engine.sequence import Sequence
from pagoda.layers import sampler as sampler_module
from pagoda.layers.sampler import (
    Sampler,
    apply_min_p,
    apply_top_k_top_p,
    argmax,
)
from pagoda.sampling_params import SamplingParams

OTHER_BUILD = use_requested_build()  # this process runs the x86-64-v3 build's code (other_build.py)

EOS = 2
VOCAB = 64


def make_seq(prompt: list[int], output: list[int] = (), **params: object) -> Sequence:
    seq = Sequence(list(prompt), SamplingParams(**params), block_size=16)
    for token in output:
        seq.append_token(token)
    return seq


def random_logits(rows: int, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3.0


def hf_warp(
    row: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0
) -> torch.Tensor:
    """The same filters through transformers' warpers (HF applies each only when it is on)."""
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k > 0:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    if min_p > 0.0:
        warpers.append(MinPLogitsWarper(min_p))
    return warpers(torch.zeros(1, 0, dtype=torch.long), row[None].clone())[0]


def assert_same_filtered(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert torch.equal(torch.isinf(actual), torch.isinf(expected))
    kept = ~torch.isinf(expected)
    torch.testing.assert_close(actual[kept], expected[kept])


TOP_K_TOP_P_ROWS = [(0, 1.0), (5, 1.0), (1, 1.0), (0, 0.9), (10, 0.5), (0, 0.3), (VOCAB, 0.95), (3, 0.99)]


@pytest.mark.parametrize("candidates", [8, 1024], ids=["nucleus-search-with-fallback", "full-sort"])
def test_top_k_top_p_match_hf_warpers_row_by_row(candidates: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sampler_module, "NUCLEUS_CANDIDATES", candidates)
    logits = random_logits(len(TOP_K_TOP_P_ROWS))
    top_k = [k for k, _ in TOP_K_TOP_P_ROWS]
    top_p = [p for _, p in TOP_K_TOP_P_ROWS]
    filtered = apply_top_k_top_p(logits, top_k, top_p)
    for row, (k, p) in enumerate(TOP_K_TOP_P_ROWS):
        assert_same_filtered(filtered[row], hf_warp(logits[row], top_k=k, top_p=p))
    assert torch.equal(filtered[0], logits[0])  # a row with neither filter is untouched
    kept = (~torch.isinf(filtered)).sum(dim=-1)
    assert kept[3:6].min() <= 8 < kept[3:6].max()  # nuclei both within and beyond 8 candidates


def test_top_k_alone_matches_hf_and_leaves_other_rows() -> None:
    logits = random_logits(4, seed=1)
    top_k = [0, 7, 0, 2]
    filtered = apply_top_k_top_p(logits, top_k, [1.0] * 4)
    for row, k in enumerate(top_k):
        expected = hf_warp(logits[row], top_k=k)
        assert_same_filtered(filtered[row], expected)
    assert int((~torch.isinf(filtered[1])).sum()) == 7


@pytest.mark.parametrize("min_p", [0.05, 0.2, 0.7])
def test_min_p_matches_hf_warper(min_p: float) -> None:
    logits = random_logits(3, seed=2)
    filtered = apply_min_p(logits, torch.full((3, 1), min_p))
    for row in range(3):
        assert_same_filtered(filtered[row], hf_warp(logits[row], min_p=min_p))


def test_repetition_penalty_matches_hf_over_prompt_and_output() -> None:
    logits = random_logits(3, seed=3)
    seqs = [
        make_seq([1, 5, 9, 5, VOCAB + 5], [11, 12], repetition_penalty=1.3),  # an id past the logits, too
        make_seq([4, 5], [5, 40], repetition_penalty=0.7),
        make_seq([6, 7], [8], repetition_penalty=1.0),
    ]
    penalised = Sampler([EOS]).penalised_logits(logits, seqs)
    for row, seq in enumerate(seqs):
        processor = RepetitionPenaltyLogitsProcessor(seq.params.repetition_penalty)
        expected = processor(torch.tensor([seq.token_ids]), logits[row][None].clone())[0]
        torch.testing.assert_close(penalised[row], expected)
    assert torch.equal(penalised[2], logits[2])


def test_frequency_and_presence_penalties_follow_openai_formula_on_output_tokens_only() -> None:
    logits = random_logits(2, seed=4)
    seqs = [
        make_seq([3, 3, 20], [20, 21, 21, 21], frequency_penalty=0.5, presence_penalty=0.25),
        make_seq([30], [31, 31], frequency_penalty=-0.4, presence_penalty=1.5),
    ]
    penalised = Sampler([EOS]).penalised_logits(logits, seqs)
    for row, seq in enumerate(seqs):
        expected = logits[row].clone()
        # OpenAI: mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence, over generated tokens
        for token, count in Counter(seq.completion_token_ids).items():
            expected[token] -= count * seq.params.frequency_penalty + seq.params.presence_penalty
        torch.testing.assert_close(penalised[row], expected)
    assert penalised[0, 3] == logits[0, 3]  # a prompt-only token is not penalised


def test_min_tokens_masks_eos_and_stop_tokens_until_reached() -> None:
    logits = torch.zeros(4, VOCAB)
    logits[:, EOS] = 10.0
    logits[:, 7] = 9.0  # a stop token id, the runner-up
    logits[:, 8] = 8.0
    seqs = [
        make_seq([1], [5], min_tokens=3, stop_token_ids=[7], temperature=0.0),
        make_seq([1], [5, 5, 5], min_tokens=3, stop_token_ids=[7], temperature=0.0),  # reached
        make_seq([1], [], min_tokens=2, ignore_eos=True, stop_token_ids=[7], temperature=0.0),
        make_seq([1], [], min_tokens=2, stop_token_ids=[7], temperature=1.0),
    ]
    sampler = Sampler([EOS])
    penalised = sampler.penalised_logits(logits, seqs)
    assert penalised[0, EOS] == float("-inf") and penalised[0, 7] == float("-inf")
    assert torch.equal(penalised[1], logits[1])
    assert penalised[2, EOS] == 10.0 and penalised[2, 7] == float("-inf")
    for _ in range(20):
        token_ids = sampler.sample(logits, seqs).token_ids
        assert token_ids[:3] == [8, EOS, EOS]
        assert token_ids[3] not in (EOS, 7)


def test_greedy_is_argmax_of_penalised_logits_and_input_is_untouched() -> None:
    logits = random_logits(3, seed=5)
    original = logits.clone()
    top = logits.argmax(dim=-1).tolist()
    seqs = [
        make_seq([1], temperature=0.0),
        make_seq([top[1]], temperature=0.0, repetition_penalty=100.0),  # penalty knocks out the argmax
        make_seq([1], temperature=0.0, top_k=3, top_p=0.5),
    ]
    token_ids = Sampler([EOS]).sample(logits, seqs).token_ids
    expected_second = RepetitionPenaltyLogitsProcessor(100.0)(
        torch.tensor([[top[1]]]), logits[1][None].clone()
    )
    assert token_ids == [top[0], int(expected_second.argmax()), top[2]]
    assert token_ids[1] != top[1]
    assert torch.equal(logits, original)


SAMPLING_CASES = [
    dict(temperature=1.0),
    dict(temperature=0.6, top_k=4),
    dict(temperature=1.3, top_p=0.7),
    dict(temperature=0.8, top_k=5, top_p=0.9, min_p=0.05),
    dict(temperature=1.0, min_p=0.2),
]


@pytest.mark.parametrize("params", SAMPLING_CASES, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()))
def test_sampled_distribution_matches_hf_filtered_softmax(params: dict) -> None:
    """Many draws from one row land on each token as often as softmax(HF-warped logits) says."""
    draws = 100_000
    row = torch.tensor([2.0, 1.5, 1.2, 0.8, 0.5, 0.0, -0.5, -1.0, -2.0, -3.0])
    expected = torch.softmax(hf_warp(row, **params), dim=-1)
    torch.manual_seed(0)
    seq = make_seq([1], **params)
    token_ids = Sampler([EOS]).sample(row.expand(draws, -1), [seq] * draws).token_ids
    observed = torch.bincount(torch.tensor(token_ids), minlength=len(row)).double() / draws
    assert torch.all(observed[expected == 0] == 0), "a filtered-out token was sampled"
    # five standard errors per token: a wrong filter or temperature moves some token by far more
    tolerance = 5 * torch.sqrt(expected * (1 - expected) / draws) + 1e-4
    assert torch.all((observed - expected.double()).abs() <= tolerance), (observed, expected)


def test_seeded_rows_repeat_whatever_their_neighbours() -> None:
    """A seeded sequence gives the same tokens alone, or among other seeded and unseeded rows."""
    sampler = Sampler([EOS])
    base = random_logits(1, seed=6)[0]
    params = dict(seed=1234, temperature=1.5, top_p=0.95)

    def run(neighbours_at, position: int = 0) -> list[int]:
        seq = make_seq([1], **params)
        drawn = []
        for step in range(15):
            seqs = neighbours_at(step)
            seqs.insert(position, seq)
            logits = random_logits(len(seqs), seed=100 + step)
            logits[position] = base
            token = sampler.sample(logits, seqs).token_ids[position]
            seq.append_token(token)
            drawn.append(token)
        return drawn

    alone = run(lambda step: [])
    crowded = run(
        lambda step: [make_seq([2], seed=step), make_seq([3], temperature=0.0), make_seq([4], top_k=3)], 2
    )
    torch.manual_seed(99)
    other_global = run(lambda step: [make_seq([5], min_p=0.1), make_seq([6], repetition_penalty=1.2)], 1)
    assert alone == crowded == other_global
    assert len(set(alone)) > 1  # it really sampled
    different_seed = make_seq([1], **{**params, "seed": 4321})
    draws = [sampler.sample(base[None], [different_seed]).token_ids[0] for _ in range(15)]
    assert draws != alone


def test_logprobs_are_raw_log_softmax_with_top_k_first() -> None:
    logits = random_logits(4, seed=7)
    raw = torch.log_softmax(logits, dim=-1)
    seqs = [
        make_seq([1], logprobs=3, temperature=0.5, repetition_penalty=1.5, top_k=10),
        make_seq([1], logprobs=None),
        make_seq([1], logprobs=0, temperature=0.0),
        make_seq([1], logprobs=5, frequency_penalty=1.0),
    ]
    output = Sampler([EOS]).sample(logits, seqs)
    assert output.logprobs[1] is None
    for row in (0, 2, 3):
        entry = output.logprobs[row]
        token = output.token_ids[row]
        k = seqs[row].params.logprobs
        top_values, top_ids = raw[row].topk(k)
        assert list(entry)[:k] == top_ids.tolist()
        assert set(entry) == set(top_ids.tolist()) | {token}
        for token_id, value in entry.items():
            assert value == pytest.approx(float(raw[row, token_id]), abs=1e-5)
    assert output.logprobs[2] == {output.token_ids[2]: pytest.approx(float(raw[2].max()), abs=1e-5)}


def test_prompt_logprobs_score_each_next_prompt_token() -> None:
    logits = random_logits(5, seed=8)
    raw = torch.log_softmax(logits, dim=-1)
    next_ids = [3, 9, 0, 63, 10]
    entries = Sampler.prompt_logprobs(logits, next_ids, 2)
    for position, (entry, token) in enumerate(zip(entries, next_ids, strict=True)):
        assert entry[token] == pytest.approx(float(raw[position, token]), abs=1e-5)
        assert list(entry)[:2] == raw[position].topk(2).indices.tolist()
        assert len(entry) == (2 if token in entry and list(entry).index(token) < 2 else 3)


@pytest.mark.parametrize("vocab_size", [384, 49152, 1000, 2049, 17])  # 1000: not in 128-column chunks
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("built", [True, False], ids=["cpp", "torch"])
def test_cpu_argmax_is_torch_argmax_ties_nan_and_inf_included(
    monkeypatch: pytest.MonkeyPatch, vocab_size: int, dtype: torch.dtype, built: bool
) -> None:
    # the C++ operator where the library is built (make install builds it), the chunked torch ops without it
    assert cpu_extension.available(), "the C++ CPU operators are not built: python -m pagoda.cpu_extension"
    if not built:
        monkeypatch.setattr(cpu_extension, "available", lambda: False)
    torch.manual_seed(0)
    logits = torch.cat([
        torch.randn(8, vocab_size),
        torch.randint(0, 3, (8, vocab_size)).float(),  # many ties: the first index must win
        torch.full((2, vocab_size), float("-inf")),
        torch.zeros(2, vocab_size),
        torch.full((2, vocab_size), float("nan")),
    ])
    logits[0, [7, vocab_size - 1]] = float("nan")
    logits[1, vocab_size // 2] = float("inf")
    logits[2, vocab_size - 1] = float("nan")  # a NaN in the last column only
    logits[3, -3:] = 1e4  # the maximum near the end, tied
    logits[18, 0] = -0.0  # equal to 0.0: the first index still wins
    logits[19, vocab_size - 1] = -0.0
    logits = logits.to(dtype)
    assert torch.equal(argmax(logits), logits.argmax(dim=-1))



def test_greedy_rows_take_the_argmax_of_half_precision_logits_as_of_their_float32_cast() -> None:
    # the LM head's bfloat16 logits: plain greedy batches skip the cast, any other row takes the float32 path
    torch.manual_seed(0)
    logits = (torch.randn(4, 1000) * 4).to(torch.bfloat16)  # coarse: many ties between columns
    logits[1, 10] = float("nan")
    sampler = Sampler([EOS])
    plain = [make_seq([1, 2], temperature=0.0) for _ in range(4)]
    assert sampler.sample(logits, plain).token_ids == logits.float().argmax(dim=-1).tolist()
    mixed = [*plain[:3], make_seq([1, 2], temperature=0.0, repetition_penalty=2.0, logprobs=2)]
    got = sampler.sample(logits, mixed)
    want = sampler.sample(logits.float(), mixed)
    assert got.token_ids == want.token_ids and got.logprobs == want.logprobs

def test_the_x86_64_v3_build_passes_these_tests_too() -> None:
    """The argmax operator as an x86-64-v3 image builds it (AVX2 vectors), on a machine whose own build has
    AVX-512; the same cached build as test_cpu_kernels'."""
    if OTHER_BUILD or "avx512f" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("the tests above ran the AVX2 code")
    rerun_under_x86_64_v3(__file__)


def test_vocabulary_wide_token_filters_are_exact_and_cheap() -> None:
    # logit_bias and allowed_token_ids over a 150k vocabulary on 32 rows: each row's filters are applied
    # as tensors built once per request (built from the lists at every step: 5 s per step)
    vocab, rows = 150_000, 32
    bias = {token: 0.5 + token % 7 for token in range(0, vocab, 2)}
    allowed = list(range(1, vocab, 3))
    seqs = [make_seq([1], logit_bias=bias, allowed_token_ids=allowed) for _ in range(rows)]
    seqs[0] = make_seq([1])  # a row without filters is left alone
    logits = random_logits(rows, vocab)
    expected = logits.clone()
    keep = torch.zeros(vocab, dtype=torch.bool)
    keep[allowed] = True
    expected[1:, ~keep] = float("-inf")
    ids = torch.tensor(list(bias))
    expected[1:, ids] += torch.tensor(list(bias.values()))
    sampler_module.apply_token_filters(logits, seqs)  # builds each request's tensors once
    start = time.perf_counter()
    filtered = sampler_module.apply_token_filters(logits, seqs)
    elapsed = time.perf_counter() - start
    torch.testing.assert_close(filtered, expected)
    assert elapsed < 2.0, f"{elapsed:.2f} s for one step's filters"
