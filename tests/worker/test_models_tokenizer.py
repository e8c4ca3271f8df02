"""The character tokenizer: saved with save_pretrained, loaded by AutoTokenizer, exact round trip."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from helios_worker.models.tokenizer import CHARACTERS, build_tokenizer, save_tokenizer

_TOKENIZER = build_tokenizer()


def test_auto_tokenizer_loads_the_saved_directory_with_its_special_tokens(tmp_path: Path) -> None:
    save_tokenizer(tmp_path)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
    text = "12+47=59\n sort 5 2 9=2 5 9"
    assert loaded(text)["input_ids"] == _TOKENIZER(text)["input_ids"]
    assert loaded(text)["input_ids"][0] == loaded.bos_token_id  # prompts start with <s>, as in training
    assert len(loaded(text, add_special_tokens=False)["input_ids"]) == len(text)  # one token per character


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=CHARACTERS, max_size=60))
def test_every_printable_text_round_trips_exactly(text: str) -> None:
    ids = _TOKENIZER(text)["input_ids"]
    assert _TOKENIZER.decode(ids, skip_special_tokens=True) == text


def test_newline_space_and_digits_are_single_distinct_tokens() -> None:
    ids = [_TOKENIZER(ch, add_special_tokens=False)["input_ids"] for ch in "\n 0123456789"]
    assert all(len(i) == 1 for i in ids)
    assert len({i[0] for i in ids}) == 12
    assert _TOKENIZER.decode([i[0] for i in ids]) == "\n 0123456789"
