"""Griffe extension: read a Google-style ``Example:`` block as an ``Examples:`` section.

Griffe only treats ``Examples:`` (plural) as the doctest section; a singular ``Example:``
becomes an admonition whose ``>>>`` lines render as nested block quotes. flowlm's docstrings
use the singular, so this extension rewrites the section title before parsing. It is a no-op
on docstrings that already say ``Examples:``.
"""

import re
from typing import Any

import griffe

_SINGULAR = re.compile(r"^(?P<indent>[ \t]*)Example:[ \t]*$", re.MULTILINE)


class ExamplesSection(griffe.Extension):
    """Rename ``Example:`` section titles to ``Examples:`` in every loaded docstring."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        docstring = obj.docstring
        if docstring is not None and "Example:" in docstring.value:
            docstring.value = _SINGULAR.sub(r"\g<indent>Examples:", docstring.value)
