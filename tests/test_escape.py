"""The escaping of untrusted text for each output sink (``pytest_gradcheck.escape``):
examples from the reliability audit (S1, S2, S4, B6) and property-based tests over
arbitrary text, lone surrogates, line and paragraph separators and control characters
included.
"""

from __future__ import annotations

import html
import re
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_gradcheck.escape import (
    annotation_data,
    annotation_property,
    decode_list,
    encode_list,
    excerpt,
    markdown_code,
    stdout_line,
)

# Arbitrary code points (surrogates too), with the characters that matter here drawn often.
DANGEROUS = list(":#[]\n\r\t |`<>&%,;\\*_~!@./= \x00\x1b\x0b\x0c\x85\u2028\u2029\u202e\xa0")
CHARS = st.one_of(st.sampled_from(DANGEROUS), st.characters(exclude_categories=()))
TEXT = st.text(CHARS, max_size=60)

# From the audit: a module name that starts workflow commands of its own (S1, B1) and a test
# id and a layer name with HTML (S2, B5).
INJECTED = "pwn\n::error file=x,line=1,title=INJECTED::fake failure\n::add-mask::x"
HTML_ID = "q`<img src=https://attacker.example/p.png><a href=https://attacker.example>click</a>"
HTML_LAYER = "`<b>bold-layer</b><img src=x>"

ORDINARY = [
    "0",
    "fc1",
    "blocks.3.mlp.fc1",
    "encoder.layer.11.attention.self.query",
    "<loss>",
    "test_models.py::test_depth[4]",
    "test_models.py::TestTwoChecks::test_two (check 2)",
    "gradcheck_models.yaml::relu_mlp",
    "couche_été.0",
    "a b-c_d",
    "",
]


def is_command(line: str) -> bool:
    """Whether the GitHub runner reads ``line`` as a workflow command: ``::`` after leading
    white space (the runner's ``TrimStart``), or the legacy ``##[`` anywhere."""
    return line.lstrip().startswith("::") or "##[" in line


# -- stdout_line ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ORDINARY)
def test_stdout_line_keeps_ordinary_names(name: str) -> None:
    assert stdout_line(name) == name


def test_stdout_line_shows_line_breaks_as_escapes() -> None:
    line = stdout_line(INJECTED)
    assert line == ("pwn\\n::error file=x,line=1,title=INJECTED::fake failure\\n::add-mask::x")
    assert stdout_line("a\rb\x1b[31mc\u2028d\x85e\tf\x00") == (
        "a\\rb\\x1b[31mc\\u2028d\\x85e\\tf\\x00"
    )
    assert stdout_line("\U000e0001 tag") == "\\U000e0001 tag"  # a format character
    assert stdout_line("\ud800") == "\\ud800"  # a lone surrogate


def test_stdout_line_cannot_start_or_embed_a_command() -> None:
    assert stdout_line("::error::x") == "\\x3a:error::x"
    assert stdout_line("   ::warning::x") == "   \\x3a:warning::x"
    assert stdout_line("\t::error::x") == "\\t::error::x"  # the tab is escaped: no white space
    assert stdout_line("\xa0::error::x") == "\\xa0::error::x"  # .NET trims NBSP as well
    assert stdout_line("a ##[add-mask]secret") == "a #\\x23[add-mask]secret"
    assert stdout_line("###[error]x") == "##\\x23[error]x"
    for text in ("::error::x", "  ::x", "##[error]x", INJECTED):
        assert not is_command(stdout_line(text))
        assert not is_command("  " + stdout_line(text))


@given(TEXT)
def test_stdout_line_is_one_line_and_never_a_command(text: str) -> None:
    line = stdout_line(text)
    assert line.isprintable()  # no control character, no separator, no surrogate
    assert "\n" not in line
    assert "\r" not in line
    assert len(line.splitlines()) <= 1
    for prefix in ("", " ", "    ", "worst layer: ", "problems: dead:"):
        assert not is_command(prefix + line)
    line.encode("utf-8")  # printable: no lone surrogate left to fail the terminal's encoder


@given(st.text(st.characters(exclude_categories=("C", "Z")) | st.just(" "), max_size=40))
def test_stdout_line_changes_printable_text_only_to_defuse_commands(text: str) -> None:
    if text.lstrip(" ").startswith(":") or "##[" in text:
        assert stdout_line(text) != text
    else:
        assert stdout_line(text) == text


# -- workflow commands ------------------------------------------------------------------------


def runner_unescape(text: str, mappings: list[tuple[str, str]]) -> str:
    """The GitHub runner's ``UnescapeData``/``UnescapeProperty``: ordered replacements."""
    for token, replacement in mappings:
        text = text.replace(replacement, token)
    return text


DATA_MAPPINGS = [("\r", "%0D"), ("\n", "%0A"), ("%", "%25")]
PROPERTY_MAPPINGS = [("\r", "%0D"), ("\n", "%0A"), (":", "%3A"), (",", "%2C"), ("%", "%25")]


def test_annotation_escaping_follows_the_toolkit() -> None:
    assert annotation_data("50% done\r\nnext") == "50%25 done%0D%0Anext"
    assert annotation_data("a::b, c:d") == "a::b, c:d"
    assert annotation_property("gradcheck: dead x2, in t") == "gradcheck%3A dead x2%2C in t"
    assert annotation_property("100%\n") == "100%25%0A"
    assert annotation_data(INJECTED) == (
        "pwn%0A::error file=x,line=1,title=INJECTED::fake failure%0A::add-mask::x"
    )
    assert annotation_data("%0A") == "%250A"  # a literal escape stays literal


@given(TEXT)
def test_annotations_round_trip_through_the_runner_and_stay_one_line(text: str) -> None:
    data, prop = annotation_data(text), annotation_property(text)
    for escaped in (data, prop):
        assert "\n" not in escaped
        assert "\r" not in escaped
    assert not set(":,") & set(prop)  # cannot end the properties or start the next one
    assert runner_unescape(data, DATA_MAPPINGS) == text
    assert runner_unescape(prop, PROPERTY_MAPPINGS) == text
    command = f"::error title={prop}::{data}"
    assert len(command.split("\n")) == 1
    assert command.split("::", 2)[1] == f"error title={prop}"


# -- Markdown ---------------------------------------------------------------------------------

PUNCTUATION = re.escape(string.punctuation)
ESCAPED = re.escape(string.punctuation.replace("-", "").replace(".", ""))  # readable
# A "_" between two letters or digits cannot start emphasis, so it is left readable.
MARKDOWN_BODY = re.compile(
    rf"(?:\\[{ESCAPED}]|&(?:amp|lt|gt);|(?<=[^\W_])_(?=[^\W_])|[^{ESCAPED}])*"
)


def rendered(code: str) -> str:
    """The text GitHub shows for ``markdown_code``'s element: entities and backslash
    escapes decoded (what CommonMark does with the content of an inline HTML element)."""
    assert code.startswith("<code>")
    assert code.endswith("</code>")
    body = code[len("<code>") : -len("</code>")]
    return html.unescape(re.sub(rf"\\([{PUNCTUATION}])", r"\1", body))


def test_markdown_code_examples() -> None:
    assert markdown_code("blocks.0.fc1") == "<code>blocks.0.fc1</code>"
    assert markdown_code("see www.x.example") == "<code>see www\\.x.example</code>"
    assert markdown_code("a|b") == "<code>a\\|b</code>"
    assert markdown_code("x<y & z>w") == "<code>x&lt;y &amp; z&gt;w</code>"
    assert markdown_code("two\nlines") == "<code>two\\\\nlines</code>"  # shows `two\nlines`
    assert markdown_code("`tick`") == "<code>\\`tick\\`</code>"
    for text in (HTML_ID, HTML_LAYER, INJECTED, "</code><img src=x>", "ok"):
        code = markdown_code(text)
        assert "<img" not in code
        assert "<b>" not in code
        assert "<a " not in code
        assert code.count("<") == 2  # its own two tags, nothing else
        assert rendered(code) == text.replace("\n", "\\n")


@given(TEXT)
def test_markdown_code_cannot_leave_its_element(text: str) -> None:
    code = markdown_code(text)
    assert code.startswith("<code>")
    assert code.endswith("</code>")
    body = code[len("<code>") : -len("</code>")]
    assert "<" not in body
    assert ">" not in body
    assert "\n" not in code
    assert "\r" not in code
    assert code.isprintable()
    # Every ASCII punctuation character but - and . is escaped (no Markdown syntax, entity or tag can
    # start), and every `|` is `\|`, which GFM keeps inside the cell.
    assert MARKDOWN_BODY.fullmatch(body)
    assert all(body[i - 1] == "\\" for i, char in enumerate(body) if char == "|")
    if text.isprintable():
        assert rendered(code) == text


@given(TEXT, TEXT)
def test_markdown_code_keeps_a_table_row_one_row(first: str, second: str) -> None:
    row = f"| {markdown_code(first)} | {markdown_code(second)} | 1.5e-3 |"
    assert len(row.splitlines()) == 1
    # GFM splits a row at pipes not preceded by a backslash: four, so three cells.
    assert len(re.findall(r"(?<!\\)\|", row)) == 4


# -- excerpt ----------------------------------------------------------------------------------

PASSWD = "root:x:0:0:root:/root:/bin/bash\n" + "daemon:x:1:1:daemon:/usr/sbin:/bin/sh\n" * 40


def test_excerpt_of_a_file_content_is_short_and_counts_it() -> None:
    shown = excerpt(PASSWD)
    assert shown.startswith("'root:x:0:0:root:/root:/bin/bash\\n")
    assert shown.endswith(f"...' ({len(PASSWD)} characters)")
    assert len(shown) <= 60 + len(f" ({len(PASSWD)} characters)")
    assert "daemon:x:1:1:daemon:/usr/sbin" not in shown
    assert "\n" not in shown
    assert excerpt("ok\n") == "'ok\\n'"
    assert excerpt("x" * 500, limit=20) == "'xxxxxxxxxxxxxxx...' (500 characters)"
    assert excerpt(b"\x00" * 100, limit=20).endswith("...' (100 bytes)")
    assert excerpt(42) == "42"
    assert excerpt("##[add-mask]x") == "'#\\x23[add-mask]x'"
    long_list = excerpt(list(range(10_000)))
    assert len(long_list) <= 60
    deep: list[object] = []
    for _ in range(10_000):
        deep = [deep]
    assert len(excerpt(deep)) <= 60  # bounded depth: no RecursionError
    with pytest.raises(ValueError, match="at least 12"):
        excerpt("x", limit=3)


def test_excerpt_survives_a_raising_repr() -> None:
    class Hostile:
        def __repr__(self) -> str:
            raise RuntimeError("no")

    assert re.fullmatch(r"<Hostile instance at 0x[0-9a-f]+>", excerpt(Hostile()))


@given(st.one_of(TEXT, st.text(CHARS, min_size=50, max_size=400), st.binary(max_size=300)))
def test_excerpt_is_bounded_one_line_and_quoted(value: str | bytes) -> None:
    for limit in (12, 60):
        shown = excerpt(value, limit)
        unit = "characters" if isinstance(value, str) else "bytes"
        note = f" ({len(value)} {unit})"
        assert shown.isprintable()
        assert "##[" not in shown
        if len(repr(value)) <= limit:
            assert shown == repr(value).replace("##[", "#\\x23[")
        else:
            assert shown.endswith(note)
            head = shown[: -len(note)]
            assert len(head) <= limit
            assert head[-4:-1] == "..."
            assert head[-1] in "'\""


# -- encode_list / decode_list ----------------------------------------------------------------


def test_plain_lists_are_unchanged() -> None:
    assert encode_list([("dead", "fc1"), ("vanishing", "enc.0")]) == "dead:fc1,vanishing:enc.0"
    assert encode_list([("nonfinite", "<loss>"), ("unused", "heads.aux-1")]) == (
        "nonfinite:<loss>,unused:heads.aux-1"
    )
    assert decode_list("dead:fc1,vanishing:enc.0") == [("dead", "fc1"), ("vanishing", "enc.0")]
    assert encode_list([]) == ""
    assert decode_list("") == []


def test_names_with_separators_stay_one_item() -> None:
    # Audit B6: a layer named 'x,dead:fake_layer' was read as two problems.
    items = [("dead", "x,dead:fake_layer"), ("dead", INJECTED), ("vanishing", "50%")]
    encoded = encode_list(items)
    assert encoded == (
        "dead:x%2Cdead%3Afake_layer,"
        "dead:pwn%0A%3A%3Aerror file=x%2Cline=1%2Ctitle=INJECTED%3A%3Afake failure"
        "%0A%3A%3Aadd-mask%3A%3Ax,"
        "vanishing:50%25"
    )
    assert decode_list(encoded) == items
    assert encode_list([("", "")]) == ":"
    assert decode_list(":") == [("", "")]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("dead", "each item must be kind:layer"),
        ("dead:a:b", "each item must be kind:layer"),
        ("dead:fc1,", "each item must be kind:layer"),
        ("dead:%zz", "two hex digits"),
        ("dead:50%", "two hex digits"),
        ("dead:%ff", "not UTF-8"),
    ],
)
def test_decode_list_refuses_malformed_values(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_list(text)


PAIRS = st.lists(st.tuples(TEXT, TEXT), max_size=6)


@given(PAIRS)
def test_encode_decode_round_trip(items: list[tuple[str, str]]) -> None:
    encoded = encode_list(items)
    assert decode_list(encoded) == items
    assert encoded.isprintable()
    assert "\n" not in encoded
    # The separators are the encoder's own: one ':' per item, one ',' between items.
    assert encoded.count(":") == len(items)
    assert encoded.count(",") == max(len(items) - 1, 0)


@given(
    st.lists(
        st.tuples(
            st.from_regex(r"[a-z_]+", fullmatch=True),
            st.from_regex(r"[A-Za-z0-9_.<>\-]*", fullmatch=True),
        ),
        max_size=5,
    )
)
def test_encode_list_keeps_plain_names_byte_identical(items: list[tuple[str, str]]) -> None:
    assert encode_list(items) == ",".join(f"{kind}:{layer}" for kind, layer in items)
