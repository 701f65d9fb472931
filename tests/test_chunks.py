"""The chunk rules on their own: role removal (property tests), usage and the held finish."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.chunks import DONE, ChunkRules, _scan_strip, strip_role

# JSON values, with decoys: strings that read like a role member, objects with a "role" key.
DECOY_TEXT = st.sampled_from(
    ['"role": "assistant", ', '{"role":"user"}', "role", "\\", '"', ",", "", "尊敬 \n"]
)
TEXT = st.one_of(st.text(max_size=12), DECOY_TEXT)
KEYS = st.one_of(st.sampled_from(["content", "tool_calls", "reasoning_content", "x"]), TEXT)
VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), TEXT),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.one_of(KEYS, st.just("role")), inner, max_size=3),
    ),
    max_leaves=8,
)
ROLE = st.one_of(st.sampled_from(["assistant", "user", ""]), st.none(), TEXT)
# (item separator, key separator): compact, llama-cpp-python's, and odder spacing.
SEPARATORS = st.sampled_from(
    [(",", ":"), (", ", ": "), (" , ", " : "), (",\t", ":\n"), ("\r\n,", ":  ")]
)


def ordered(pairs: list[tuple[str, object]], extra: dict, position: int) -> dict:
    """A dict of ``pairs`` with the members of ``extra`` inserted at ``position``."""
    items = list(pairs)
    items[position:position] = list(extra.items())
    return dict(items)


@st.composite
def chunks_with_role(draw: st.DrawFn) -> tuple[dict, dict]:
    """(a chunk whose choices[0].delta has a role, the same chunk without it)."""
    others = draw(st.dictionaries(KEYS.filter(lambda k: k != "role"), VALUES, max_size=4))
    pairs = list(others.items())
    role_at = draw(st.integers(0, len(pairs)))  # first, in the middle, last, or alone
    delta = ordered(pairs, {"role": draw(ROLE)}, role_at)
    choice_pairs = [("index", 0), ("finish_reason", None), ("logprobs", draw(VALUES))]
    choice = ordered(choice_pairs, {"delta": delta}, draw(st.integers(0, 3)))
    second = {"index": 1, "delta": {"role": "assistant", "content": "kept"}}
    choices = [choice, second] if draw(st.booleans()) else [choice]
    top_pairs = [("id", "chatcmpl-1"), ("role", "top-level, kept"), ("usage", draw(VALUES))]
    doc = ordered(top_pairs, {"choices": choices}, draw(st.integers(0, 3)))
    expected = json.loads(json.dumps(doc))
    del expected["choices"][0]["delta"]["role"]
    return doc, expected


# The fast path (try each "role" key, keep the cut that parses right) and the structural
# walk it falls back to must cut exactly the same bytes.
@pytest.mark.parametrize("strip", [strip_role, _scan_strip], ids=["strip_role", "scan"])
@settings(max_examples=300, deadline=None)
@given(
    chunks_with_role(),
    SEPARATORS,
    st.sampled_from([None, 0, 2]),
    st.booleans(),
)
def test_strip_role_removes_the_member_and_keeps_every_other_byte(
    strip, pair, separators, indent, ascii_only
):
    doc, expected = pair

    def dumps(obj: dict) -> str:
        return json.dumps(obj, separators=separators, indent=indent, ensure_ascii=ascii_only)

    text = dumps(doc)
    stripped = strip(text)
    assert json.loads(stripped) == expected
    # Byte for byte what the upstream would have written without the member: the
    # member goes with exactly one separator, all other spacing stays.
    assert stripped == dumps(expected)


@settings(max_examples=200, deadline=None)
@given(chunks_with_role(), SEPARATORS)
def test_relayed_content_chunks_are_the_stripped_text(pair, separators):
    doc, expected = pair
    doc["choices"][0]["delta"]["content"] = "x"
    expected["choices"][0]["delta"]["content"] = "x"
    text = json.dumps(doc, separators=separators, ensure_ascii=False)
    out = ChunkRules("u", "a").apply(text)
    assert out == [json.dumps(expected, separators=separators, ensure_ascii=False)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # llama-cpp-python's spacing, role first.
        (
            (
                '{"id": "c", "choices": [{"index": 0, "delta": {"role": "assistant", '
                '"content": "abs"}, "logprobs": null, "finish_reason": null}]}'
            ),
            (
                '{"id": "c", "choices": [{"index": 0, "delta": {"content": "abs"}, '
                '"logprobs": null, "finish_reason": null}]}'
            ),
        ),
        # A repeated key: both go (a parser would have taken the last one).
        (
            '{"choices":[{"delta":{"role":"a","content":"c","role":"b"}}]}',
            '{"choices":[{"delta":{"content":"c"}}]}',
        ),
        # Only the delta of choices[0]; whitespace around the document is kept.
        (
            ' {"choices":[{"delta":{"content":"c","role":"a"}},{"delta":{"role":"a"}}]}\t',
            ' {"choices":[{"delta":{"content":"c"}},{"delta":{"role":"a"}}]}\t',
        ),
        # No role member at all: unchanged.
        (
            '{"choices":[{"delta":{"content":"role"}}]}',
            '{"choices":[{"delta":{"content":"role"}}]}',
        ),
    ],
)
@pytest.mark.parametrize("strip", [strip_role, _scan_strip], ids=["strip_role", "scan"])
def test_strip_role_examples(strip, text, expected):
    assert strip(text) == expected


@pytest.mark.parametrize(
    "text",
    ['{"choices":[{"delta":{"content":"c"', '{"choices": {"delta": {}}}', "[1]", ""],
)
def test_strip_role_gives_none_for_text_of_another_shape(text):
    assert strip_role(text) is None


def test_a_chunk_the_scanners_cannot_follow_is_re_serialised_without_the_role():
    # ujson reads a number with a leading zero; the standard library's scanner does not.
    text = '{"choices":[{"delta":{"role":01,"content":"ab"}}]}'
    assert strip_role(text) is None and _scan_strip(text) is None
    (out,) = ChunkRules("u", "a").apply(text)
    assert json.loads(out) == {"choices": [{"delta": {"content": "ab"}}]}


def test_odd_json_away_from_the_role_member_still_gets_the_exact_cut():
    text = '{"choices":[{"delta":{"role":"assistant","content":"ab"}}],"n":01}'
    assert _scan_strip(text) is None  # the walk stops at 01; the fast path never reads it
    assert strip_role(text) == '{"choices":[{"delta":{"content":"ab"}}],"n":01}'


def test_raw_control_characters_in_strings_do_not_stop_the_scan():
    # Not strict, like ujson: a raw tab or newline inside a string is read as itself.
    text = '{"choices":[{"delta":{"role":"assistant","content":"a\tb\x01"}}]}'
    assert strip_role(text) == '{"choices":[{"delta":{"content":"a\tb\x01"}}]}'


def test_a_chunk_without_a_role_is_relayed_as_the_same_object():
    text = '{"choices": [{"delta": {"content": "x"}}]}'
    (out,) = ChunkRules("u", "a").apply(text)
    assert out is text  # the cheap path: no scan, no copy


def finish(usage: dict | None = None, **delta: str) -> str:
    doc: dict = {"choices": [{"index": 0, "delta": delta, "finish_reason": "stop"}]}
    if usage is not None:
        doc["usage"] = usage
    return json.dumps(doc)


def test_the_finish_chunk_is_held_until_the_usage_and_takes_it():
    rules = ChunkRules("alice", "uid")
    assert rules.apply(finish()) == [] and rules.holding and rules.finished
    (out,) = rules.apply(json.dumps({"choices": [], "usage": {"total_tokens": 3}}))
    doc = json.loads(out)
    assert doc["usage"] == {"total_tokens": 3}
    assert doc["choices"][0]["delta"]["userId"] == "alice"
    assert not rules.holding and not rules.done
    assert rules.apply(DONE) == [DONE] and rules.done


def test_done_releases_the_held_finish_chunk_first():
    rules = ChunkRules("u", "a")
    rules.apply(finish(usage={"prompt_tokens": 1, "completion_tokens": 2}))
    out = rules.apply(DONE)
    assert len(out) == 2 and out[1] == DONE
    assert json.loads(out[0])["usage"] == {"prompt_tokens": 1, "completion_tokens": 2}


def test_complete_ends_only_a_finished_answer_and_only_once():
    rules = ChunkRules("u", "a")
    assert rules.complete() == []  # no finish chunk: nothing completes it
    rules.apply(finish())
    out = rules.complete()
    assert len(out) == 2 and out[1] == DONE and rules.done
    assert rules.complete() == []


def test_usage_chunks_without_a_finish_chunk_are_never_relayed():
    rules = ChunkRules("u", "a")
    assert rules.apply(json.dumps({"choices": [], "usage": {"total_tokens": 1}})) == []
    empty = {"choices": [{"index": 0, "delta": {}}], "usage": {"total_tokens": 2}}
    assert rules.apply(json.dumps(empty)) == []
    assert rules.usage == {"total_tokens": 2}
