"""The generated tasks: deterministic, labelled, and answerable from the prompt alone."""

from __future__ import annotations

import itertools

from helios_worker.models.tasks import (
    TASKS,
    eval_examples,
    exact_match,
    examples,
    kind_of,
    solve,
    training_stream,
    workload_prompts,
)


def test_the_same_seed_gives_the_same_stream_and_another_seed_differs() -> None:
    first = list(itertools.islice(training_stream(3), 200))
    assert first == list(itertools.islice(training_stream(3), 200))
    assert first != list(itertools.islice(training_stream(4), 200))


def test_the_stream_mixes_every_task() -> None:
    tasks = {ex.task for ex in itertools.islice(training_stream(0), 300)}
    assert tasks == set(TASKS)


def test_every_generated_prompt_is_solved_back_to_its_answer_and_kind() -> None:
    for ex in itertools.islice(training_stream(11), 2000):
        assert solve(ex.prompt) == (ex.answer, ex.kind), ex


def test_examples_of_a_kind_cover_its_tasks_and_only_them() -> None:
    easy = examples(30, "easy", seed=1)
    hard = examples(30, "hard", seed=1)
    assert {ex.task for ex in easy} == {"copy", "repeat", "template"}
    assert {ex.task for ex in hard} == {"add", "sort"}
    assert all(ex.kind == "easy" for ex in easy) and all(ex.kind == "hard" for ex in hard)


def test_known_answers() -> None:
    assert solve("12+47=") == ("59", "hard")
    assert solve("sort 5 2 9=") == ("2 5 9", "hard")
    assert solve("copy cat dog=") == ("cat dog", "easy")
    assert solve("repeat owl 3=") == ("owl owl owl", "easy")
    assert solve("the cat=") == ("sat on the mat", "easy")
    assert solve("hello world") is None and kind_of("what is 2+2?") is None


def test_exact_match_takes_the_first_line_and_ignores_surrounding_spaces() -> None:
    assert exact_match("12+47=", "59")
    assert exact_match("12+47=", " 59 \nsort 1 2=1 2")
    assert not exact_match("12+47=", "58")
    assert not exact_match("12+47=", "590")
    assert not exact_match("not a task", "anything")


def test_evaluation_and_workload_prompts_are_labelled_and_mostly_unseen_in_training() -> None:
    held_out = eval_examples(20)
    assert [ex.kind for ex in held_out] == ["easy"] * 20 + ["hard"] * 20
    assert all(kind_of(p) == "hard" for p in workload_prompts("hard", 10))
    assert all(kind_of(p) == "easy" for p in workload_prompts("easy", 10))
    seen = {ex.prompt for ex in itertools.islice(training_stream(0), 5000)}
    hard_unseen = [ex for ex in held_out if ex.task == "add" and ex.prompt not in seen]
    assert len(hard_unseen) >= 5  # additions held out are mostly new to the model
