"""Span search against a brute-force search on random logits, with masks, ownership and ties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.stages.spans import SpanRules, search_spans


def passage_rules(ctx_start, ctx_len, L, cls_pos=None) -> SpanRules:
    """A chunk that owns every span of its passage positions [ctx_start, ctx_start + ctx_len)."""
    pos = torch.arange(L)[None, :]
    in_ctx = (pos >= ctx_start[:, None]) & (pos < (ctx_start + ctx_len)[:, None])
    return SpanRules(in_ctx, in_ctx.clone(), ctx_start, ctx_start + ctx_len, torch.zeros_like(ctx_start),
                     torch.zeros_like(ctx_start) if cls_pos is None else cls_pos)


def brute_force(start, end, rules: SpanRules, b: int, max_answer_len: int):
    """Every valid (s, e) of chunk b with its float32 score, best first; ties by smaller s, then e."""
    lo, hi, prev = int(rules.own_lo[b]), int(rules.own_hi[b]), int(rules.prev_end[b])
    spans = []
    for s in range(len(start)):
        for e in range(s, min(s + max_answer_len, len(start))):
            owned = lo <= s < hi or (s < lo and e >= prev)
            if rules.start_ok[b, s] and rules.end_ok[b, e] and owned:
                score = float(np.float32(start[s]) + np.float32(end[e]))
                spans.append((-score, s, e))
    spans.sort()
    return [(s, e, -neg) for neg, s, e in spans]


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("k", [1, 2, 3])
def test_matches_brute_force(seed, k, device):
    g = torch.Generator().manual_seed(seed)
    B, L = 7, 41
    integer = seed % 2 == 0  # small integer logits: many exact ties
    if integer:
        start = torch.randint(-3, 4, (B, L), generator=g).float()
        end = torch.randint(-3, 4, (B, L), generator=g).float()
    else:
        start, end = torch.randn(B, L, generator=g), torch.randn(B, L, generator=g)
    ctx_start = torch.randint(0, 20, (B,), generator=g)
    ctx_len = torch.minimum(torch.randint(0, 25, (B,), generator=g), L - ctx_start)
    ctx_len[0] = 0  # a chunk without passage tokens
    ctx_len[1] = 1
    rules = passage_rules(ctx_start, ctx_len, L)
    if seed >= 4:  # holes in the start/end masks and a home narrower than the passage
        rules.start_ok &= torch.rand(B, L, generator=g) > 0.3
        rules.end_ok &= torch.rand(B, L, generator=g) > 0.3
        rules.own_lo = ctx_start + torch.randint(0, 5, (B,), generator=g)
        rules.own_hi = rules.own_lo + torch.randint(0, 15, (B,), generator=g)
        rules.prev_end = ctx_start + torch.randint(0, 12, (B,), generator=g)
    A = [1, 4, 30][seed % 3]
    out = search_spans(start.to(device), end.to(device), rules.to(device), A, k).to("cpu")
    for b in range(B):
        ref = brute_force(start[b].tolist(), end[b].tolist(), rules, b, A)
        mine = [(int(s), int(e), float(v)) for s, e, v in zip(out.start[b], out.end[b], out.score[b])
                if math.isfinite(float(v))]
        assert mine == [(s, e, pytest.approx(v)) for s, e, v in ref[:k]]
        lse = float(torch.logsumexp(torch.tensor([v for _, _, v in ref]), 0)) if ref else -math.inf
        assert float(out.log_norm[b]) == pytest.approx(lse, abs=1e-5)
        assert float(out.null_score[b]) == pytest.approx(float(start[b, 0] + end[b, 0]))


def test_half_precision_logits_are_searched_in_float32():
    start = torch.tensor([[0.0, 1.0, 2.0, 0.5]], dtype=torch.float16)
    end = torch.tensor([[0.0, 0.5, 1.0, 3.0]], dtype=torch.float16)
    out = search_spans(start, end, passage_rules(torch.tensor([1]), torch.tensor([3]), 4), 30)
    assert out.score.dtype == torch.float32
    assert (int(out.start[0, 0]), int(out.end[0, 0])) == (2, 3)
    assert float(out.score[0, 0]) == 5.0


def test_max_answer_len_limits_the_span():
    start = torch.tensor([[0.0, 9.0, 0.0, 0.0, 0.0, 0.0]])
    end = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 9.0]])
    out = search_spans(start, end, passage_rules(torch.tensor([1]), torch.tensor([5]), 6), 3)
    assert int(out.end[0, 0]) - int(out.start[0, 0]) < 3
    np.testing.assert_allclose(float(out.score[0, 0]), 9.0)


def test_a_span_starting_before_the_home_belongs_here_only_past_the_previous_chunk():
    # positions 1..8 are passage; home [4, 9); the previous chunk's passage ends before position 6
    start = torch.tensor([[0.0, 0.0, 9.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    end = torch.tensor([[0.0, 0.0, 0.0, 5.0, 0.0, 0.0, 4.0, 0.0, 0.0]])
    rules = passage_rules(torch.tensor([1]), torch.tensor([8]), 9)
    rules.own_lo, rules.own_hi, rules.prev_end = torch.tensor([4]), torch.tensor([9]), torch.tensor([6])
    out = search_spans(start, end, rules, 30)
    # (2, 3) scores 14 but lies whole in the previous chunk: (2, 6) at 13 is this chunk's best
    assert (int(out.start[0, 0]), int(out.end[0, 0])) == (2, 6)


@pytest.mark.parametrize("seed", range(20))
def test_log_norm_is_the_logsumexp_to_one_ulp_in_any_order(seed):
    """log_norm (summed in float64) is the exact logsumexp of the span scores to one float32
    unit in the last place, also with the spans in another order: -inf spans count for nothing,
    a chunk without a valid span gets -inf, and an infinite score gives +inf (as torch's)."""
    from pipeline.stages.spans import log_sum_exp

    g = torch.Generator().manual_seed(seed)
    band = torch.randn(4, 384 * 30, generator=g) * 4
    band[band < -3] = float("-inf")  # masked spans
    band[2] = float("-inf")  # a chunk with no valid span
    band[3, 7] = float("inf")  # an overflowed score
    got = log_sum_exp(band)
    assert got[2].item() == float("-inf") and got[3].item() == float("inf")
    shuffled = log_sum_exp(band[:, torch.randperm(band.shape[1], generator=g)])
    assert torch.equal(shuffled[2:], got[2:])
    for b in range(2):
        finite = [v for v in band[b].double().tolist() if v != float("-inf")]
        top = max(finite)
        exact = top + math.log(math.fsum(math.exp(v - top) for v in finite))
        one_ulp = float(np.spacing(np.float32(exact)))
        assert abs(got[b].item() - exact) <= one_ulp
        assert abs(shuffled[b].item() - got[b].item()) <= one_ulp


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_a_chunk_is_finite_only_if_every_logit_it_reads_is(value):
    """`finite` looks at the logits a span or the null score can read: passage tokens and CLS,
    not padding or question tokens (whose values no answer depends on)."""
    B, L = 4, 12
    start, end = torch.randn(B, L), torch.randn(B, L)
    rules = passage_rules(torch.tensor([3, 3, 3, 3]), torch.tensor([6, 6, 6, 6]), L)
    start[0, 5] = value  # a passage token: read
    end[1, 0] = value  # CLS: the null score reads it
    start[2, 1] = value  # a question token: never read
    end[3, 11] = value  # padding: never read
    got = search_spans(start, end, rules, max_answer_len=4, k=2)
    assert got.finite.tolist() == [False, False, True, True]
    assert torch.isfinite(got.score[2:]).all() and torch.isfinite(got.log_norm[2:]).all()
