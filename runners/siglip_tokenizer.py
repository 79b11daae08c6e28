"""A SigLIP-style tokenizer trained locally (no hub): a Unigram model from the ``tokenizers`` package, saved as a
transformers ``PreTrainedTokenizerFast`` directory that ``AutoTokenizer.from_pretrained`` (open_clip's HFTokenizer,
runners/siglip.py) loads offline.

Like SigLIP's SentencePiece tokenizers: lower-cased, ``</s>`` appended to every text, padding with ``<pad>`` (id 0)
to the model's full context (``padding="max_length"``). Used by the tests' tiny SigLIP models and by the shapes SigLIP
the project trains (tools/train_shapes_siglip.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"


def train_tokenizer(texts: Iterable[str], directory: Path, vocab_size: int = 256) -> int:
    """Train a Unigram tokenizer on ``texts`` and save it to ``directory``; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, EOS, UNK], unk_token=UNK, show_progress=False
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, tok.token_to_id(EOS))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK)
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(directory))
    return len(fast)
