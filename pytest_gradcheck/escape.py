"""Escaping of untrusted text (module names, test ids, YAML values) for each output sink.

Module names, parametrize ids, suite entries and policy values come from code and files
that a reviewer may treat as data. Wherever such text is written, it goes through exactly
one function of this module, chosen by where it lands:

=========================  ===========================================================
sink                       function
=========================  ===========================================================
a terminal or log line     :func:`stdout_line`
a GitHub workflow command  :func:`annotation_data` (the message), :func:`annotation_property`
                           (``file=``, ``title=``, ...)
a Markdown table cell      :func:`markdown_code` (the step summary)
an error message           :func:`excerpt` (a short quoted excerpt of a file's content)
one JUnit property value   :func:`encode_list` / :func:`decode_list` (``kind:layer`` pairs)
=========================  ===========================================================

The workflow-command rules follow GitHub's ``actions/toolkit`` (``command.ts``:
``escapeData`` and ``escapeProperty``) and what the runner parses: a line whose text, after
leading white space, starts with ``::`` is a command (``::error``, ``::add-mask::``,
``::stop-commands::``), and so is a line holding the legacy form ``##[command]`` anywhere.

Pure Python: this module imports nothing from the package, nor torch or pytest.
"""

from __future__ import annotations

import re
import reprlib
from collections.abc import Iterable

__all__ = [
    "annotation_data",
    "annotation_property",
    "decode_list",
    "encode_list",
    "excerpt",
    "markdown_code",
    "stdout_line",
]

_NAMED_ESCAPES = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}
_ASCII_PUNCTUATION = frozenset("!\"#$%&'()*+,/:;<=>?@[\\]^_`{|}~")
"""Backslash-escaped in Markdown. ``-`` and ``.`` stay readable (``bold-layer``,
``blocks.0.fc1``): inside a cell neither can start a list, a rule or a link, but a ``.``
after ``www`` is escaped too (GitHub's autolinks start at ``www.``, ``:`` and ``@``)."""
_HTML_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
_LEGACY_COMMAND = re.compile(r"##\[")
_LEADING_COMMAND = re.compile(r"^( *):")


def _legacy_escaped(match: re.Match[str]) -> str:
    """``##[`` shown as ``#\\x23[``: no longer the runner's legacy command prefix."""
    return "#\\x23["


def _escape_char(char: str) -> str:
    """``char`` as the escape that :func:`repr` would show for it: ``\\n``, ``\\x1b``,
    ``\\u2028``, ``\\U000e0001``."""
    named = _NAMED_ESCAPES.get(char)
    if named is not None:
        return named
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _visible(text: str) -> str:
    """``text`` with every character that :meth:`str.isprintable` rejects shown as its
    escape, as :func:`repr` shows it.

    That covers all control characters (``\\r``, ``\\n``, ESC and the rest of C0 and C1),
    the line and paragraph separators, format characters (bidirectional overrides,
    zero-width joiners), lone surrogates and every white space but the ASCII space. Other
    characters, including non-ASCII letters, stay as they are.
    """
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _escape_char(char) for char in text)


def stdout_line(text: str) -> str:
    """``text`` made safe to print as part of one terminal or CI log line.

    The result holds no line break and no control character: each character that is not
    printable is shown as its escape (``\\n``, ``\\r``, ``\\x1b``, ``\\u2028``), as
    :func:`repr` shows it, so a name cannot start a new line, move the cursor or colour the
    terminal. So that the result cannot be read as a GitHub workflow command, a leading
    ``:`` (after ASCII spaces) is shown as ``\\x3a`` and the legacy command prefix ``##[``
    as ``#\\x23[``. Ordinary names (``blocks.0.attn``, ``test_a.py::test_m[relu-4]``)
    come back unchanged.

    The guarantee holds for the result on its own and after a prefix that ends in a
    character other than ``#``; the backslash itself is not escaped, so the result is for
    reading, not for parsing back.
    """
    line = _LEGACY_COMMAND.sub(_legacy_escaped, _visible(text))
    return _LEADING_COMMAND.sub(lambda match: match.group(1) + "\\x3a", line, count=1)


def annotation_data(text: str) -> str:
    """The message of a GitHub workflow command (``::error file=...::MESSAGE``).

    As ``escapeData`` in actions/toolkit ``command.ts``: ``%`` -> ``%25``, ``\\r`` ->
    ``%0D``, ``\\n`` -> ``%0A``; the runner reverses it, so the annotation shows ``text``
    with its line breaks, and a line break cannot end the command early.
    """
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def annotation_property(text: str) -> str:
    """A property value of a GitHub workflow command (``file=``, ``title=``).

    As ``escapeProperty`` in actions/toolkit ``command.ts``: :func:`annotation_data`, and
    also ``:`` -> ``%3A`` (which would end the properties) and ``,`` -> ``%2C`` (which
    would start the next property).
    """
    return annotation_data(text).replace(":", "%3A").replace(",", "%2C")


def _markdown_char(char: str) -> str:
    entity = _HTML_ENTITIES.get(char)
    if entity is not None:
        return entity
    if char in _ASCII_PUNCTUATION:
        return "\\" + char
    return char


def _markdown_at(text: str, i: int) -> str:
    """Character ``i`` of ``text`` in Markdown: a ``.`` after ``www`` is escaped (an autolink
    starts there), a ``_`` between two letters or digits is not (it cannot start emphasis:
    ``test_models``); every other character as :func:`_markdown_char` writes it."""
    char = text[i]
    if char == ".":
        return "\\." if text[max(0, i - 3) : i].lower() == "www" else "."
    if char == "_" and 0 < i < len(text) - 1 and text[i - 1].isalnum() and text[i + 1].isalnum():
        return "_"
    return _markdown_char(char)


def markdown_code(text: str) -> str:
    """``text`` as inline code in GitHub-flavoured Markdown, safe inside a table cell.

    The result is a ``<code>`` element whose content is ``text`` with:

    - every non-printable character shown as its escape, as in :func:`stdout_line`, so the
      result is one line and the table row stays one row;
    - ``&``, ``<`` and ``>`` written as the entities ``&amp;``, ``&lt;`` and ``&gt;``: the
      result holds no ``<`` or ``>`` but those of its own two tags, so no HTML element can
      start or end inside it (``</code>`` included);
    - every other ASCII punctuation character but ``-``, ``.`` and a ``_`` inside a word
      backslash-escaped (``\\|``, ``\\*``,
      ``\\[``, ``\\:``, ``\\.``, ``\\\\``, a backtick too): a Markdown backslash escape
      renders as the character itself, so no emphasis, link, code span, autolink
      (``https\\://``, ``www\\.``) or table-cell boundary (GFM reads ``\\|`` as a pipe
      inside the cell) can start inside it.

    Letters, digits, spaces and non-ASCII printable characters are left as they are. A
    ``<code>`` element (not a backtick span) is used because entities and escapes are
    decoded inside it, so GitHub shows ``text`` as it is, in a code font; GitHub's
    sanitizer keeps ``<code>``, and its mention and issue-reference links skip code.
    """
    visible = _visible(text)
    body = "".join(_markdown_at(visible, i) for i in range(len(visible)))
    return f"<code>{body}</code>"


def excerpt(value: object, limit: int = 60) -> str:
    """A short, quoted excerpt of an untrusted value, for an error message.

    A :class:`str` or :class:`bytes` value is shown as :func:`repr` shows it when that fits
    in ``limit`` characters; else its start, cut to fit, then ``...`` and the total length:
    ``'root:x:0:0:root:/root:/bin/bash\\ndaemon:x:1:1:...' (1312 characters)``. Other values
    are shown with :mod:`reprlib` (bounded even for huge or deeply nested containers),
    cut the same way. The excerpt is one line (line breaks and control characters are
    escaped, as :func:`repr` does) of at most ``limit`` characters plus the length note, and
    holds no ``##[`` (shown as ``#\\x23[``). ``limit`` must be at least 12.
    """
    if limit < 12:
        raise ValueError(f"excerpt limit must be at least 12, got {limit}")
    if isinstance(value, (str, bytes)):
        shown = _sequence_excerpt(value, limit)
    else:
        shown = _object_excerpt(value, limit)
    return _LEGACY_COMMAND.sub(_legacy_escaped, shown)


def _sequence_excerpt(value: str | bytes, limit: int) -> str:
    full = repr(value)
    if len(full) <= limit:
        return full
    unit = "characters" if isinstance(value, str) else "bytes"
    # repr(value[:n]) grows with n; find the longest prefix whose repr, less its closing
    # quote, plus "..." and the quote fits in the limit.
    low, high = 0, min(len(value), limit)
    while low < high:
        middle = (low + high + 1) // 2
        if len(repr(value[:middle])) + 3 <= limit:
            low = middle
        else:
            high = middle - 1
    head = repr(value[:low])
    return f"{head[:-1]}...{head[-1]} ({len(value)} {unit})"


def _object_excerpt(value: object, limit: int) -> str:
    bounded = reprlib.Repr()
    bounded.maxstring = bounded.maxother = limit
    bounded.maxlevel = 3
    shown = _visible(bounded.repr(value))  # reprlib survives a __repr__ that raises
    if len(shown) <= limit:
        return shown
    return f"{shown[: limit - 3]}... ({type(value).__name__})"


# -- a list of (kind, layer) pairs in one property value --------------------------------------

_FIELD_SPECIALS = frozenset("%,:")
_HEX_PAIR = re.compile(r"[0-9A-Fa-f]{2}")


def _encode_field(text: str) -> str:
    if text.isprintable() and not _FIELD_SPECIALS.intersection(text):
        return text
    parts = []
    for char in text:
        if char in _FIELD_SPECIALS or not char.isprintable():
            parts.append("".join(f"%{byte:02X}" for byte in char.encode("utf-8", "surrogatepass")))
        else:
            parts.append(char)
    return "".join(parts)


def _decode_field(text: str, whole: str) -> str:
    if "%" not in text:
        return text
    data = bytearray()
    index = 0
    while index < len(text):
        char = text[index]
        if char != "%":
            data += char.encode("utf-8", "surrogatepass")
            index += 1
            continue
        digits = text[index + 1 : index + 3]
        if not _HEX_PAIR.fullmatch(digits):
            raise ValueError(
                f"malformed list {excerpt(whole)}: '%' must be followed by two hex digits"
            )
        data.append(int(digits, 16))
        index += 3
    try:
        return data.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        raise ValueError(f"malformed list {excerpt(whole)}: its %-escapes are not UTF-8") from None


def encode_list(items: Iterable[tuple[str, str]]) -> str:
    """``(kind, layer)`` pairs as one string: ``kind:layer`` joined by ``,``.

    In each field, ``%``, ``,``, ``:`` and every non-printable character (control
    characters and line breaks included) are percent-escaped as the bytes of their UTF-8
    encoding (``,`` -> ``%2C``, ``\\n`` -> ``%0A``); everything else is kept, so
    ``[("dead", "fc1"), ("vanishing", "enc.0")]`` is ``dead:fc1,vanishing:enc.0``, as
    before. :func:`decode_list` reverses it exactly for any list of pairs of strings (lone
    surrogates included). The empty list is the empty string.
    """
    return ",".join(f"{_encode_field(kind)}:{_encode_field(layer)}" for kind, layer in items)


def decode_list(text: str) -> list[tuple[str, str]]:
    """The ``(kind, layer)`` pairs that :func:`encode_list` wrote into ``text``.

    Raises :class:`ValueError`, quoting a short excerpt of ``text``, when an item has no
    ``:`` or more than one, or a ``%`` is not followed by two hex digits that decode as
    UTF-8.
    """
    if not text:
        return []
    pairs = []
    for item in text.split(","):
        fields = item.split(":")
        if len(fields) != 2:
            raise ValueError(
                f"malformed list {excerpt(text)}: each item must be kind:layer with ':', "
                "',' and '%' in names escaped as %3A, %2C and %25"
            )
        kind, layer = fields
        pairs.append((_decode_field(kind, text), _decode_field(layer, text)))
    return pairs
