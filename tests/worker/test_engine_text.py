"""Streamed text: incremental detokenisation and stop sequences, with the project's tokenizer and a
byte-level one where characters span several tokens."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from helios_worker.engine.stops import IncrementalDetokenizer, StopMatcher
from helios_worker.models.tokenizer import CHARACTERS, build_tokenizer, encode

CHAR_TOKENIZER = build_tokenizer()


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per byte (GPT-2 style byte-level): a non-ASCII character takes several tokens."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    core = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(alphabet))}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core)


BYTE_TOKENIZER = byte_tokenizer()


def stream(tokenizer: PreTrainedTokenizerFast, prompt: list[int], ids: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt)
    pieces = [detok.push(i) for i in ids]
    pieces[-1] += detok.flush()
    return pieces


@given(st.text(alphabet=CHARACTERS, min_size=1, max_size=30), st.text(alphabet=CHARACTERS, max_size=30))
def test_streamed_text_concatenates_to_the_decoded_text(prompt: str, text: str) -> None:
    ids = encode(CHAR_TOKENIZER, text) or [CHAR_TOKENIZER.eos_token_id]
    pieces = stream(CHAR_TOKENIZER, encode(CHAR_TOKENIZER, prompt), ids)
    assert "".join(pieces) == CHAR_TOKENIZER.decode(ids, skip_special_tokens=True)


@given(st.text(min_size=1, max_size=12))
def test_multibyte_characters_are_held_until_complete(text: str) -> None:
    ids = BYTE_TOKENIZER(text)["input_ids"]
    pieces = stream(BYTE_TOKENIZER, [], ids)
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces) or "\ufffd" in text


def test_a_three_byte_character_arrives_with_its_last_byte() -> None:
    ids = BYTE_TOKENIZER("a€")["input_ids"]
    assert len(ids) == 4
    assert stream(BYTE_TOKENIZER, [], ids) == ["a", "", "", "€"]


def test_special_tokens_add_no_text() -> None:
    detok = IncrementalDetokenizer(CHAR_TOKENIZER, encode(CHAR_TOKENIZER, "hi"))
    assert detok.push(CHAR_TOKENIZER.eos_token_id) == ""


@pytest.mark.parametrize(
    ("pieces", "stops", "emitted", "stopped"),
    [
        (["hello", " wor", "ld"], ("wor",), ["hello", " "], True),
        (["ab", "c"], ("bc",), ["a", ""], True),
        (["ab", "x"], ("bc",), ["a", "bx"], False),
        (["x", "STOP"], ("ST", "STOP"), ["x", ""], True),
        (["abc"], (), ["abc"], False),
    ],
)
def test_stop_matcher_cuts_at_the_first_stop_and_holds_possible_starts(
    pieces: list[str], stops: tuple[str, ...], emitted: list[str], stopped: bool
) -> None:
    matcher = StopMatcher(stops)
    results = [matcher.push(p) for p in pieces[: len(emitted)]]
    assert [text for text, _ in results] == emitted
    assert results[-1][1] is stopped


@given(st.lists(st.text(alphabet="abc", max_size=4), max_size=10), st.text(alphabet="abc", min_size=1, max_size=3))
def test_stop_matcher_output_is_the_text_before_the_first_stop(pieces: list[str], stop: str) -> None:
    matcher = StopMatcher((stop,))
    out = ""
    for piece in pieces:
        text, stopped = matcher.push(piece)
        out += text
        if stopped:
            break
    else:
        out += matcher.flush()
    whole = "".join(pieces)
    assert out == (whole[: whole.index(stop)] if stop in whole else whole)
