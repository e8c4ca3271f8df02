"""How close served tokens are to their references: the serving candidate's full model (teacher-forced
and free-running), the largest candidate, and exact match on the generated tasks."""

from __future__ import annotations

import torch

from helios_bench.prepare import Setup
from helios_bench.results import Accuracy
from helios_bench.stats import (
    agreement_interval,
    exact_match_rates,
    forced_agreement,
    sequence_agreement,
    token_agreement,
)
from helios_bench.systems import Completion, Prompt

CHUNK = 16  # evaluation prompts per reference batch


class References:
    """Each candidate's full model on the evaluation prompts, run once per candidate (and per served output)."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self._outputs: dict[str, list[Completion]] = {}
        self._gaps: dict[tuple[str, Prompt, tuple[int, ...]], list[float]] = {}

    def full_outputs(self, candidate: str) -> list[Completion]:
        """The candidate at full depth with exits off on the evaluation prompts: its own reference."""
        if candidate not in self._outputs:
            s = self.setup
            system = s.engine(s.load(candidate, None), exits=False, max_batch=CHUNK)
            try:
                self._outputs[candidate] = system.run_batch(s.prompts.eval_prompts, s.options.max_new_tokens)
            finally:
                system.close()
        return self._outputs[candidate]

    def gaps(self, candidate: str, completions: list[Completion]) -> list[list[float]]:
        """The candidate's full model, teacher-forced on each prompt + served output (the plain
        transformers forward, independent of the engine): at every served position, its probability of
        its own greedy token minus its probability of the served token (0: it agrees)."""
        s = self.setup
        pairs = zip(s.prompts.eval_prompts, completions, strict=True)
        keys = [(candidate, prompt, tuple(c.token_ids)) for prompt, c in pairs]
        todo = [k for k in dict.fromkeys(keys) if k not in self._gaps and k[2]]
        if todo:
            model = s.load(candidate, None)
            with torch.inference_mode():
                for begin in range(0, len(todo), CHUNK):
                    chunk = todo[begin : begin + CHUNK]
                    rows = [list(prompt) + list(tokens[:-1]) for _, prompt, tokens in chunk]
                    width = max(len(r) for r in rows)
                    ids = torch.zeros((len(rows), width), dtype=torch.long)
                    mask = torch.zeros((len(rows), width), dtype=torch.long)
                    for i, r in enumerate(rows):  # right-padded: positions stay those of the unpadded row
                        ids[i, : len(r)] = torch.tensor(r)
                        mask[i, : len(r)] = 1
                    logits = model.hf_model(input_ids=ids.to(s.device), attention_mask=mask.to(s.device)).logits
                    probs = torch.softmax(logits.float(), dim=-1)
                    for i, (_, prompt, tokens) in enumerate(chunk):
                        start = len(prompt) - 1
                        p = probs[i, start : start + len(tokens)]
                        served = torch.tensor(tokens, device=p.device)[:, None]
                        gap = p.max(dim=-1).values - p.gather(1, served)[:, 0]
                        self._gaps[chunk[i]] = [float(x) for x in gap.tolist()]
            del model
        return [self._gaps.get(k, []) for k in keys]


def accuracy(setup: Setup, references: References, completions: list[Completion], served_by: list[str]) -> Accuracy:
    """Agreement with the full model of the candidate that served each prompt (what the floor bounds),
    with the largest candidate, free-running and per sequence; and exact match on the tasks."""
    tokens = [c.token_ids for c in completions]
    own_gaps: list[list[float]] = [[] for _ in completions]
    for candidate in dict.fromkeys(served_by):
        gaps = references.gaps(candidate, completions)
        for i, c in enumerate(served_by):
            if c == candidate:
                own_gaps[i] = gaps[i]
    largest_gaps = references.gaps(setup.largest, completions)
    own_free = [references.full_outputs(c)[i].token_ids for i, c in enumerate(served_by)]
    em = exact_match_rates([e.prompt for e in setup.prompts.eval_examples], [c.text for c in completions])
    agreement = forced_agreement(own_gaps, setup.tie_tolerance)
    n = sum(len(t) for t in tokens)
    return Accuracy(
        agreement=agreement,
        strict_agreement=forced_agreement(own_gaps, 0.0),
        agreement_ci95=agreement_interval(round(agreement * n), n),
        floor_met=agreement >= setup.options.accuracy_floor,
        agreement_with_largest=forced_agreement(largest_gaps, setup.tie_tolerance),
        free_running_agreement=token_agreement(tokens, own_free),
        sequence_agreement=sequence_agreement(tokens, own_free),
        exact_match=em["all"],
        exact_match_easy=em["easy"],
        exact_match_hard=em["hard"],
        requests=len(completions),
        tokens=n,
    )
