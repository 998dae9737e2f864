"""Tiny real checkpoints for tests: tokenizers trained in-process, random-weight models.

Everything is saved to a directory and loaded back with from_pretrained, exactly as a
user's checkpoint is loaded. Nothing is downloaded.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

CORPUS = [
    "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy.",
    "They were descended from Norse raiders and pirates from Denmark, Iceland and Norway.",
    "Computational complexity theory classifies computational problems by their inherent difficulty.",
    "What is the capital of France? Paris is the capital and most populous city of France.",
    "Who wrote the report in 1987 and where was it published?",
    "Café résumé naïve façade déjà vu — accents everywhere: ÉÀÇ ñ ü ø å.",
    "東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다.",
    "Emoji 😀 🚀 👩‍💻 and flags 🇫🇷 appear in support tickets 🙂.",
    "Combining marks: e\u0301 a\u0308 o\u0302 and line breaks\r\nwindows style\r\n.",
    "Contract 42-B: the term is twelve (12) months, renewable; fees are $1,200.00 per year.",
    "alpha omega beta gamma delta epsilon zeta eta theta iota kappa lambda mu",
    "Right to left: שלום עולם مرحبا بالعالم, zero width\u200djoiner\u200b here.",
] * 4


def _train(tok: Tokenizer, trainer) -> Tokenizer:
    trainer.show_progress = False  # no progress bar, no blank lines
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


def bert_tokenizer_object(lowercase: bool = True) -> Tokenizer:
    """A WordPiece tokenizer with the BERT pipeline: normalizer, pre-tokenizer, template."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=None)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    _train(tok, trainers.WordPieceTrainer(vocab_size=600, special_tokens=special))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    tok.decoder = decoders.WordPiece()
    return tok


def roberta_tokenizer_object() -> Tokenizer:
    """A byte-level BPE tokenizer with RoBERTa's <s> A </s></s> B </s> template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    _train(tok, trainers.BpeTrainer(vocab_size=700, special_tokens=special,
                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.RobertaProcessing(
        ("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>")),
        trim_offsets=True, add_prefix_space=False,
    )
    return tok


def unigram_tokenizer_object() -> Tokenizer:
    """A SentencePiece-style Unigram tokenizer (ALBERT, DeBERTa-v2/v3): Metaspace, [CLS]/[SEP]."""
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    _train(tok, trainers.UnigramTrainer(vocab_size=600, special_tokens=special, unk_token="[UNK]"))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return tok


FAMILIES = ("bert", "roberta", "distilbert", "albert", "electra", "deberta-v2")


def save_tokenizer(tok: Tokenizer, directory: str, family: str, padding_side: str = "right"):
    from transformers import PreTrainedTokenizerFast

    if family == "roberta":
        specials = dict(bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
                        unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")
    else:
        specials = dict(unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                        cls_token="[CLS]", mask_token="[MASK]")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, padding_side=padding_side,
                                   model_max_length=512, **specials)
    if family in ("roberta", "distilbert"):
        fast.model_input_names = ["input_ids", "attention_mask"]
    fast.save_pretrained(directory)
    return fast


def make_checkpoint(directory: str, family: str = "bert", seed: int = 0, padding_side: str = "right",
                    max_position_embeddings: int = 512) -> str:
    """Save a tiny random-weight QA model and its tokenizer to `directory`; return it."""
    import torch
    from transformers import (AlbertConfig, AutoModelForQuestionAnswering, BertConfig, DebertaV2Config,
                              DistilBertConfig, ElectraConfig, RobertaConfig)

    os.makedirs(directory, exist_ok=True)
    if family == "roberta":
        tok = roberta_tokenizer_object()
    elif family in ("albert", "deberta-v2"):
        tok = unigram_tokenizer_object()
    else:
        tok = bert_tokenizer_object()
    fast = save_tokenizer(tok, directory, family, padding_side)
    vocab = tok.get_vocab_size()
    if family == "bert":
        config = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=max_position_embeddings,
                            pad_token_id=fast.pad_token_id)
    elif family == "roberta":
        config = RobertaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=max_position_embeddings + 2,
                               pad_token_id=fast.pad_token_id, bos_token_id=fast.cls_token_id,
                               eos_token_id=fast.sep_token_id, type_vocab_size=1)
    elif family == "distilbert":
        config = DistilBertConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                  max_position_embeddings=max_position_embeddings,
                                  pad_token_id=fast.pad_token_id)
    elif family == "albert":
        config = AlbertConfig(vocab_size=vocab, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                              num_attention_heads=2, intermediate_size=64,
                              max_position_embeddings=max_position_embeddings, pad_token_id=fast.pad_token_id)
    elif family == "electra":
        config = ElectraConfig(vocab_size=vocab, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=64,
                               max_position_embeddings=max_position_embeddings, pad_token_id=fast.pad_token_id)
    elif family == "deberta-v2":
        config = DebertaV2Config(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=max_position_embeddings,
                                 relative_attention=True, position_buckets=16, max_relative_positions=-1,
                                 pos_att_type=["p2c", "c2p"], position_biased_input=False, type_vocab_size=0,
                                 pad_token_id=fast.pad_token_id)
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = AutoModelForQuestionAnswering.from_config(config)
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar
    try:
        model.save_pretrained(directory)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return directory


class TableModel(torch.nn.Module):
    """Logits looked up by token id: the same in any batch, any padding. Few values: many ties."""

    def __init__(self, vocab_size: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.start = torch.randint(-4, 5, (vocab_size,), generator=g).float() / 2
        self.end = torch.randint(-4, 5, (vocab_size,), generator=g).float() / 2

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        return SimpleNamespace(start_logits=self.start[input_ids], end_logits=self.end[input_ids])


class Models(dict):
    def __repr__(self) -> str:  # hypothesis prints its arguments: keep failure reports short
        return "models"


if __name__ == "__main__":
    # python tests/tiny_models.py DIR [bert|roberta|distilbert]: a random-weight checkpoint for
    # trying qa-batch offline (its answers are meaningless; the pipeline around it is real).
    import sys

    print(make_checkpoint(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "bert"))
