"""Chunk stage: turn (passage, question) rows into model-sized token chunks.

Each distinct passage and each distinct question of a window is tokenized once, without
special tokens; chunks are then assembled from slices of those token arrays and the
tokenizer's own special-token template. The result equals what the tokenizer gives for
`tokenizer(question, passage, truncation="only_second", max_length=max_seq_len,
stride=doc_stride, return_overflowing_tokens=True)` (tests check this), at a fraction
of the cost when questions share a passage.

Window rule (the tokenizers meaning of `stride`): a chunk holds up to
`budget = max_seq_len - special tokens - question tokens` passage tokens; chunk i starts
at passage token i * (budget - doc_stride); the last chunk is the first that reaches the
passage's end. So consecutive chunks share exactly `doc_stride` passage tokens.

Ownership rule (each distinct passage span is scored by exactly one chunk): chunk c owns the
start tokens of its *home*, from the middle of its overlap with chunk c-1 to the middle of
its overlap with chunk c+1, where a token has the most context on both sides (BERT
run_squad's "max context" idea). A span whose start is at home in c but which runs past c's
end is owned instead by the first later chunk that holds it whole. So every span that fits
in some chunk is owned by exactly one chunk, and nothing is counted twice.

Canonical spans: byte-level tokenizers split one character into several tokens with the
same offsets. A span may start only at the first token of its start character and end only
at the last token of its end character, so each character span is one candidate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from ..errors import RuntimeFailure, UsageError
from ..wording import plural

# Encoded once when a Chunker is made: symbols of scripts few vocabularies hold (a snowman, Gothic,
# Cyrillic multiocular O, a rune; BERT's uncased vocabulary holds none) send a WordPiece tokenizer to
# its unknown token, so a tokenizer that cannot encode text fails here, before any work
PROBE = "qa-batch probe \u2603 \U00010330 \ua66e \u16a0"


@dataclass(frozen=True)
class PairTemplate:
    """Where the tokenizer's post-processor puts special tokens around a sequence pair."""

    question_first: bool  # BERT-likes: [CLS] question [SEP] passage [SEP]
    prefix: np.ndarray  # special ids before the first sequence
    middle: np.ndarray  # between the sequences (RoBERTa: </s></s>)
    suffix: np.ndarray  # after the second sequence
    prefix_types: np.ndarray
    middle_types: np.ndarray
    suffix_types: np.ndarray
    first_type: int  # token type id of the first sequence's tokens
    second_type: int
    cls_id: int | None

    @property
    def n_special(self) -> int:
        return len(self.prefix) + len(self.middle) + len(self.suffix)

    def cls_position(self, length: int) -> int:
        """Where a chunk of `length` tokens has its CLS token (the null answer); 0 without one."""
        if self.cls_id is not None:
            if self.cls_id in self.prefix:
                return int(np.flatnonzero(self.prefix == self.cls_id)[0])
            if self.cls_id in self.suffix:  # XLNet-style templates put CLS last
                return length - len(self.suffix) + int(np.flatnonzero(self.suffix == self.cls_id)[0])
        return 0


def _plain_backend(tokenizer) -> Tokenizer:
    """A private copy of the Rust tokenizer with truncation and padding switched off."""
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()
    return backend


def pair_template(tokenizer, backend: Tokenizer | None = None) -> PairTemplate:
    """Read the special-token layout off the tokenizer's post-processor with a probe pair."""
    backend = backend or _plain_backend(tokenizer)
    question_first = getattr(tokenizer, "padding_side", "right") == "right"
    first = backend.encode("what is it", add_special_tokens=False)
    second = backend.encode("it is a probe", add_special_tokens=False)
    pair = backend.encode("what is it", "it is a probe", add_special_tokens=True)
    seq = pair.sequence_ids
    ids = np.asarray(pair.ids, dtype=np.int64)
    types = np.asarray(pair.type_ids, dtype=np.int64)
    pos_first = [i for i, s in enumerate(seq) if s == 0]
    pos_second = [i for i, s in enumerate(seq) if s == 1]
    a0, a1 = pos_first[0], pos_first[-1] + 1
    b0, b1 = pos_second[0], pos_second[-1] + 1
    if a1 - a0 != len(first.ids) or b1 - b0 != len(second.ids) or a1 > b0:
        raise ValueError("unsupported tokenizer template: the two sequences are not contiguous and ordered")
    cls_id = tokenizer.cls_token_id if getattr(tokenizer, "cls_token", None) else None
    return PairTemplate(
        question_first=question_first,
        prefix=ids[:a0], middle=ids[a1:b0], suffix=ids[b1:],
        prefix_types=types[:a0], middle_types=types[a1:b0], suffix_types=types[b1:],
        first_type=int(types[a0]), second_type=int(types[b0]),
        cls_id=cls_id,
    )


def chunk_windows(n_tokens: int, budget: int, stride: int) -> list[tuple[int, int]]:
    """[start, stop) passage-token windows; consecutive windows share `stride` tokens."""
    if n_tokens <= budget:
        return [(0, n_tokens)]
    step = budget - stride
    out = []
    for start in range(0, n_tokens, step):
        stop = min(start + budget, n_tokens)
        out.append((start, stop))
        if stop == n_tokens:
            break
    return out


@dataclass
class ChunkSet:
    """The chunks of one window of rows. Chunks of a row are consecutive.

    A chunk is not stored as tokens: it is a slice of its passage's token ids between the
    question's ids and the template's special tokens, assembled only when a batch is
    padded (`assemble`). Memory per chunk is a few integers, whatever the passage length.
    """

    template: PairTemplate
    question_ids: list[np.ndarray]  # per distinct question of the window
    passage_ids: list[np.ndarray]  # per distinct passage of the window
    chunk_question: np.ndarray  # [chunks] index into question_ids
    chunk_passage: np.ndarray  # [chunks] index into passage_ids
    row: np.ndarray  # [chunks] the chunk's row within the window
    ctx_start: np.ndarray  # [chunks] position of the chunk's first passage token
    ctx_len: np.ndarray  # [chunks] number of passage tokens in the chunk
    token_start: np.ndarray  # [chunks] index of that token among the row's passage tokens
    own_lo: np.ndarray  # [chunks] the chunk's home: passage tokens [own_lo, own_hi) (ownership rule)
    own_hi: np.ndarray  # [chunks]
    prev_end: np.ndarray  # [chunks] passage-token end of the previous chunk of the row (0 for the first)
    cls_pos: np.ndarray  # [chunks] position whose logits give the null score
    lengths: np.ndarray  # [chunks] tokens in the chunk, special tokens included
    offsets: np.ndarray  # [all passage tokens of the window, 2] character offsets, passages concatenated
    can_start: np.ndarray  # [all passage tokens of the window] bool: first token of its start character
    can_end: np.ndarray  # [all passage tokens of the window] bool: last token of its end character
    token_base: np.ndarray  # [rows] where each row's passage tokens start in `offsets`
    chunk_count: np.ndarray  # [rows] chunks per row (0 for rows with an error)
    errors: list[str | None]  # [rows] why a row gets no answer, or None

    def __len__(self) -> int:
        return len(self.row)

    def assemble(self, c: int, ids_out: np.ndarray, types_out: np.ndarray) -> None:
        """Write chunk c's token ids and type ids into the given rows (views of a batch)."""
        t = self.template
        q = self.question_ids[self.chunk_question[c]]
        start = self.token_start[c]
        p = self.passage_ids[self.chunk_passage[c]][start : start + self.ctx_len[c]]
        first, second = (q, p) if t.question_first else (p, q)
        at = 0
        for piece, kind in ((t.prefix, t.prefix_types), (first, t.first_type), (t.middle, t.middle_types),
                            (second, t.second_type), (t.suffix, t.suffix_types)):
            ids_out[at : at + len(piece)] = piece
            types_out[at : at + len(piece)] = kind
            at += len(piece)

    def chunk_ids(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """Chunk c's token ids and type ids as arrays (for tests and tools)."""
        ids = np.empty(self.lengths[c], dtype=np.int64)
        types = np.empty(self.lengths[c], dtype=np.int64)
        self.assemble(c, ids, types)
        return ids, types


def canonical_ends(offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which tokens may start and end a span: the first of the tokens sharing a start offset,
    the last of the tokens sharing an end offset (one token span per character span)."""
    n = len(offsets)
    can_start = np.ones(n, dtype=bool)
    can_end = np.ones(n, dtype=bool)
    if n > 1:
        can_start[1:] = offsets[1:, 0] != offsets[:-1, 0]
        can_end[:-1] = offsets[:-1, 1] != offsets[1:, 1]
    return can_start, can_end


def homes(windows: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(own_lo, own_hi, prev_end) of each window: the ownership rule in the module docstring."""
    out = []
    for c, (start, stop) in enumerate(windows):
        lo = 0 if c == 0 else (start + windows[c - 1][1]) // 2
        hi = stop if c == len(windows) - 1 else (windows[c + 1][0] + stop) // 2
        out.append((lo, hi, 0 if c == 0 else windows[c - 1][1]))
    return out


def row_error(passage, question) -> str | None:
    """Rows without usable text are answered with null and a reason, never dropped."""
    for name, text in (("passage", passage), ("question", question)):
        if text is None:
            return f"{name} is null"
        if not text.strip():
            return f"{name} is empty" if text == "" else f"{name} is only whitespace"
    return None


class Chunker:
    """Tokenizes windows of rows into chunks with one model's tokenizer and limits."""

    def __init__(self, tokenizer, max_seq_len: int, doc_stride: int, max_question_len: int | None = None):
        self.backend = _plain_backend(tokenizer)
        self.template = pair_template(tokenizer, self.backend)
        self.max_seq_len = max_seq_len
        self.doc_stride = doc_stride
        self.max_question_len = max_question_len  # None: never cut a question (too long: row error)
        try:
            self._encode([PROBE], with_offsets=True)
        except RuntimeFailure as e:
            raise UsageError(str(e)) from None

    def _encode(self, texts: list[str], with_offsets: bool) -> list:
        if not texts:
            return []
        try:
            if not with_offsets and hasattr(self.backend, "encode_batch_fast"):
                return self.backend.encode_batch_fast(texts, add_special_tokens=False)
            return self.backend.encode_batch(texts, add_special_tokens=False)
        except Exception as e:  # noqa: BLE001 - the Rust tokenizer raises plain Exception
            raise RuntimeFailure(
                f"the model's tokenizer cannot encode the text ({e}): its files are inconsistent (a WordPiece "
                "vocabulary must hold its unknown token); save the tokenizer again with the checkpoint") from None

    def question_tokens(self, questions: list[str]) -> list[np.ndarray]:
        """Each question's token ids as its chunks hold them (its first `max_question_len` with
        --truncate-question); also what the question list's up-front check measures (questions.py)."""
        ids = [np.asarray(e.ids, dtype=np.int64) for e in self._encode(questions, with_offsets=False)]
        if self.max_question_len is not None:
            ids = [x[: self.max_question_len] for x in ids]
        return ids

    def __call__(self, passages: list[str | None], questions: list[str | None]) -> ChunkSet:
        t = self.template
        errors = [row_error(p, q) for p, q in zip(passages, questions)]
        ok = [i for i, e in enumerate(errors) if e is None]

        # Tokenize each distinct text once; the Rust batch call runs on all cores.
        uniq_p = list(dict.fromkeys(passages[i] for i in ok))
        uniq_q = list(dict.fromkeys(questions[i] for i in ok))
        p_index = {p: j for j, p in enumerate(uniq_p)}
        q_index = {q: j for j, q in enumerate(uniq_q)}
        p_enc = self._encode(uniq_p, with_offsets=True)
        q_ids = self.question_tokens(uniq_q)
        p_ids = [np.asarray(e.ids, dtype=np.int64) for e in p_enc]
        p_off = [np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2) for e in p_enc]

        # Offsets of every row's passage tokens, concatenated (rows sharing a passage share them).
        p_base = np.zeros(len(uniq_p) + 1, dtype=np.int64)
        np.cumsum([len(x) for x in p_ids], out=p_base[1:])
        offsets = np.concatenate(p_off) if p_off else np.zeros((0, 2), dtype=np.int64)
        ends = [canonical_ends(o) for o in p_off]
        can_start = np.concatenate([a for a, _ in ends]) if ends else np.zeros(0, dtype=bool)
        can_end = np.concatenate([b for _, b in ends]) if ends else np.zeros(0, dtype=bool)
        token_base = np.zeros(len(passages), dtype=np.int64)

        chunk_question, chunk_passage = [], []
        row, ctx_start, ctx_len, token_start, cls_pos, lengths = [], [], [], [], [], []
        own_lo, own_hi, prev_end = [], [], []
        chunk_count = np.zeros(len(passages), dtype=np.int64)
        for i in ok:
            pj, qj = p_index[passages[i]], q_index[questions[i]]
            ids_p, ids_q = p_ids[pj], q_ids[qj]  # with --truncate-question, the question's first tokens
            token_base[i] = p_base[pj]
            budget = self.max_seq_len - t.n_special - len(ids_q)
            if len(ids_p) > budget and budget <= self.doc_stride:
                n_q, left = len(ids_q), max(budget, 0)
                errors[i] = (
                    f"question too long: {plural(n_q, 'token')} {'leaves' if n_q == 1 else 'leave'} "
                    f"{plural(left, 'passage token')} per chunk, which must exceed --doc-stride {self.doc_stride}; shorten the question, "
                    "raise --max-seq-len, lower --doc-stride, or pass --truncate-question"
                )
                continue
            if len(ids_p) == 0:
                errors[i] = "passage has no tokens after tokenization"
                continue
            ctx = len(t.prefix) + (len(ids_q) + len(t.middle) if t.question_first else 0)
            windows = chunk_windows(len(ids_p), budget, self.doc_stride)
            for (start, stop), (lo, hi, prev) in zip(windows, homes(windows)):
                length = t.n_special + len(ids_q) + stop - start
                chunk_question.append(qj)
                chunk_passage.append(pj)
                row.append(i)
                ctx_start.append(ctx)
                ctx_len.append(stop - start)
                token_start.append(start)
                own_lo.append(lo)
                own_hi.append(hi)
                prev_end.append(prev)
                cls_pos.append(t.cls_position(length))
                lengths.append(length)
                chunk_count[i] += 1

        def arr(x):
            return np.asarray(x, dtype=np.int64)

        return ChunkSet(
            template=t, question_ids=q_ids, passage_ids=p_ids, chunk_question=arr(chunk_question),
            chunk_passage=arr(chunk_passage), row=arr(row), ctx_start=arr(ctx_start), ctx_len=arr(ctx_len),
            token_start=arr(token_start), own_lo=arr(own_lo), own_hi=arr(own_hi), prev_end=arr(prev_end),
            cls_pos=arr(cls_pos), lengths=arr(lengths),
            offsets=offsets, can_start=can_start, can_end=can_end, token_base=token_base, chunk_count=chunk_count, errors=errors,
        )
