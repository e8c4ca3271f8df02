"""The bench's phases that need no engine: the prompts every configuration is measured on."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from helios_bench.options import BenchOptions
from helios_bench.systems import Prompt
from helios_worker.models import tasks


@dataclass(frozen=True)
class Prompts:
    """The evaluation and profiling prompts, as examples and as the token ids every candidate shares."""

    eval_examples: list[tasks.Example]
    profile_examples: list[tasks.Example]
    eval_prompts: list[Prompt]
    profile_prompts: list[Prompt]
    context: int  # the longest prompt plus max_new_tokens
    decode_context: int  # the longest prompt plus decode_tokens


def prepare_prompts(options: BenchOptions, model_dirs: Sequence[Path]) -> Prompts:
    """Draw the prompts (neither training nor the evaluation's seeds) and tokenize them once; the
    candidates must tokenize alike, or agreement between them means nothing."""
    from transformers import AutoTokenizer

    o = options
    per_kind = math.ceil(o.prompts / 2)
    eval_examples = interleave(tasks.eval_examples(per_kind, seed=o.seed))[: o.prompts]
    profile_seed = o.seed + 3 * tasks.EVAL_SEED_OFFSET  # neither training nor the evaluation draws here
    easy = tasks.examples(math.ceil(o.profile_requests / 2), "easy", profile_seed)
    hard = tasks.examples(math.ceil(o.profile_requests / 2), "hard", profile_seed + 1)
    profile_examples = interleave([*easy, *hard])[: o.profile_requests]
    tokenizers = [AutoTokenizer.from_pretrained(str(path)) for path in model_dirs]
    texts = [e.prompt for e in eval_examples] + [e.prompt for e in profile_examples]
    encoded = [[tuple(int(i) for i in tok(t)["input_ids"]) for t in texts] for tok in tokenizers]
    if any(e != encoded[0] for e in encoded[1:]):
        raise RuntimeError("the candidates tokenize the prompts differently; agreement needs one tokenizer")
    n = len(eval_examples)
    longest = max(len(p) for p in encoded[0])
    return Prompts(
        eval_examples,
        profile_examples,
        encoded[0][:n],
        encoded[0][n:],
        context=longest + o.max_new_tokens,
        decode_context=longest + o.decode_tokens,
    )


def interleave(examples: list[tasks.Example]) -> list[tasks.Example]:
    """Easy and hard alternately, so any prefix is a mix."""
    easy = [e for e in examples if e.kind == "easy"]
    hard = [e for e in examples if e.kind == "hard"]
    out: list[tasks.Example] = []
    for i in range(max(len(easy), len(hard))):
        out += easy[i : i + 1] + hard[i : i + 1]
    return out
