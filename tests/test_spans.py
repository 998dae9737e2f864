"""Span search against a brute-force search on random logits, with masks and ties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.spans import search_spans


def brute_force(start, end, ctx_start, ctx_len, max_answer_len):
    """Every valid (s, e) with its score, best first; ties by smaller s, then smaller e."""
    spans = []
    for s in range(ctx_start, ctx_start + ctx_len):
        for e in range(s, min(s + max_answer_len, ctx_start + ctx_len)):
            spans.append((-(start[s] + end[e]), s, e))
    spans.sort()
    return [(s, e, -neg) for neg, s, e in spans]


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [1, 3])
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
    cls_pos = torch.zeros(B, dtype=torch.long)
    A = [1, 4, 30][seed % 3]
    out = search_spans(*(t.to(device) for t in (start, end, ctx_start, ctx_len, cls_pos)), A, k).to("cpu")
    for b in range(B):
        ref = brute_force(start[b].tolist(), end[b].tolist(), int(ctx_start[b]), int(ctx_len[b]), A)
        mine = [(int(s), int(e), float(v)) for s, e, v in zip(out.start[b], out.end[b], out.score[b])
                if math.isfinite(float(v))]
        assert mine == [(s, e, pytest.approx(v)) for s, e, v in ref[:k]]
        lse = float(torch.logsumexp(torch.tensor([v for _, _, v in ref]), 0)) if ref else -math.inf
        assert float(out.log_norm[b]) == pytest.approx(lse, abs=1e-5)
        assert float(out.null_score[b]) == pytest.approx(float(start[b, 0] + end[b, 0]))


def test_half_precision_logits_are_searched_in_float32():
    start = torch.tensor([[0.0, 1.0, 2.0, 0.5]], dtype=torch.float16)
    end = torch.tensor([[0.0, 0.5, 1.0, 3.0]], dtype=torch.float16)
    out = search_spans(start, end, torch.tensor([1]), torch.tensor([3]), torch.tensor([0]), 30)
    assert out.score.dtype == torch.float32
    assert (int(out.start[0, 0]), int(out.end[0, 0])) == (2, 3)
    assert float(out.score[0, 0]) == 5.0


def test_max_answer_len_limits_the_span():
    start = torch.tensor([[0.0, 9.0, 0.0, 0.0, 0.0, 0.0]])
    end = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 9.0]])
    out = search_spans(start, end, torch.tensor([1]), torch.tensor([5]), torch.tensor([0]), 3)
    assert int(out.end[0, 0]) - int(out.start[0, 0]) < 3
    np.testing.assert_allclose(float(out.score[0, 0]), 9.0)
