import json
import random

import pytest

from nanoseek.tasks import Problem, extract_answer, format_ok, full_marks, get_task
from nanoseek.tasks.countdown import InvalidExpression, evaluate


def test_worked_solutions_score_full_marks():
    for name in ["arithmetic", "countdown", "multiplication@1-4"]:
        task, rng = get_task(name), random.Random(0)
        for _ in range(200):
            p = task.sample(rng)
            for pad in (True, False):
                sol = task.solution(p, scratchpad=pad)
                assert format_ok(p.full_completion(sol)) and task.score(p, sol) == 1.0
                # without the scratchpad the model is shown answering at once: nothing inside <think>
                assert (sol.split("</think>")[0].strip() == "") is not pad
    r1 = get_task("arithmetic", template="r1zero").sample(random.Random(0))
    assert r1.prompt.startswith("A conversation between User and Assistant") and r1.prompt.endswith(
        "Assistant:"
    )
    assert format_ok(r1.full_completion(get_task("arithmetic").solution(r1)))


def test_multiplication_steps_and_size():
    """Column multiplication by one digit, least significant digit first, each step's carry shown; the
    size counts every distinct question (what caps the held-out share)."""
    task = get_task("multiplication@1-2")
    p = Problem("What is 478 * 6", 2868, 3, {"a": 478, "b": 6, "op": "*"})
    assert task.solution(p).startswith("8*6=48, 7*6+4=46, 4*6+4=28, so 2868 </think>")
    questions = {task.sample(random.Random(i)).question for i in range(20000)}
    assert len(questions) == task.size == 8 * (8 + 90)


def test_countdown_rewards():
    task = get_task("countdown")
    p = task.sample(random.Random(1), 3)
    a, b, c = p.data["numbers"]
    assert task.check(p, p.data["expression"]) == 1.0
    assert task.check(p, f"{a} + {b}") == 0.1  # well formed, not all numbers
    assert task.check(p, f"{a} + {b} + {c} + 1") == 0.1  # an extra number
    assert task.check(p, "hello") == 0.0


@pytest.mark.parametrize(
    "expr",
    ["(" * 10000 + "1" + ")" * 10000, "1" * 1_000_000, "١+٢", "__import__('os')", "1 if 1 else 2", "1e9"],
)
def test_countdown_guards_refuse_before_parsing(expr, monkeypatch):
    """Huge, deep or foreign-character answers never reach the parser (so they cost a scan, not a parse)."""
    import ast

    monkeypatch.setattr(ast, "parse", lambda *a, **k: pytest.fail("parser reached"))
    with pytest.raises(InvalidExpression):
        evaluate(expr)


@pytest.mark.parametrize("expr", ["9**9**9", "1/0", "-(1)", "2*(3+", "(1+2)(3)"])
def test_countdown_rejects_unsafe_or_invalid_trees(expr):
    with pytest.raises(InvalidExpression):  # powers are refused as nodes: 9**9**9 is never computed
        evaluate(expr)


def test_evaluate_is_exact_rational():
    value, used = evaluate("(1 / 3) * 3")
    assert value == 1 and used == [1, 3, 3]


def test_arithmetic_check_and_format():
    task = get_task("arithmetic")
    p = task.make(random.Random(0), 3)
    assert task.score(p, f"<think> x </think> <answer> {p.answer} </answer>") == 1.0
    assert task.score(p, f"<answer> {p.answer + 1} </answer>") == 0.0
    assert task.score(p, "<answer> ٣ </answer>") == 0.0
    for odd in ("--5", "1_0", "-", "+5"):  # int() raises on some, accepts others: none is an answer
        assert task.check(p, odd) == 0.0
    assert extract_answer("<answer>1</answer> <answer> 2 </answer>") == "2"
    assert format_ok("<think> a </think> <answer> 5 </answer>")
    assert not format_ok("<think> a </think> <answer>  </answer>")  # empty answer
    assert not format_ok("<think> a </think><think> b </think> <answer> 5 </answer>")  # repeated tag
    assert not format_ok("<answer> 5 </answer> <think> a </think>")  # wrong order


def test_answer_parsing_takes_one_pass_over_megabyte_completions():
    """A pattern that rescans the rest of the text from every unclosed tag is quadratic (the old regex:
    3.3 s at 64k characters, 73 s at 256k); one pass takes milliseconds. The alarm is a watchdog that
    turns the quadratic case into a failure instead of a hung suite, not a benchmark."""
    import signal

    def too_slow(*_):
        raise TimeoutError("quadratic answer parsing")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(10)
    try:
        assert extract_answer("<answer>" * 125_000) is None
        assert not format_ok("</think><answer>" * 60_000)
        p = get_task("countdown").sample(random.Random(0))
        assert get_task("countdown").score(p, "<answer>" * 125_000) == 0.0
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert extract_answer("<answer><answer>2</answer></answer>") == "<answer>2"  # pairs read left to right


def test_a_verifier_that_raises_counts_as_wrong_in_evaluation():
    def broken(problem, completion):
        raise ZeroDivisionError("oops")

    with pytest.warns(UserWarning, match="ZeroDivisionError: oops"):
        assert full_marks(broken, None, "x") is False
    assert full_marks(lambda p, c: 1.0, None, "x") is True


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task"):
        get_task("chess")


def test_language_consistency_reward_is_the_share_of_words_in_the_script():
    from nanoseek.tasks import get_task
    from nanoseek.tasks.rewards import RewardSet, language_consistency

    p = get_task("arithmetic").sample(random.Random(0))
    assert language_consistency(p, "add the ones 3 + 4 = 7 </think> <answer> 7 </answer>") == 1.0
    assert language_consistency(p, "add два числа </think> <answer> 7 </answer>") == pytest.approx(1 / 3)
    assert language_consistency(p, "1 + 2 </think> <answer> 3 </answer>") == 1.0  # numbers are neutral
    assert (
        language_consistency(p, "x </think> words after the reasoning всё") == 1.0
    )  # only the reasoning counts
    total, parts = RewardSet(get_task("arithmetic"), {"accuracy": 1.0, "consistency": 0.5})(
        p, "сумма </think>"
    )
    assert parts["consistency"] == 0.0 and total == 0.0


def test_user_jsonl_task(tmp_path, monkeypatch):
    f = tmp_path / "t.jsonl"
    f.write_text(
        '{"prompt": "Half of one?", "answer": "1/2"}\n{"prompt": "Expand (x+1)^2", "answer": "x^2 + 2*x + 1", '
        '"difficulty": 2}\n{"prompt": "Capital of France?", "answer": "Paris"}\n'
    )
    task = get_task(f"jsonl:{f}")
    assert task.difficulties == (1, 2)
    rng = random.Random(0)
    problems = {p.question: p for p in (task.sample(rng) for _ in range(40))}
    half, expand, paris = problems["Half of one?"], problems["Expand (x+1)^2"], problems["Capital of France?"]
    assert (
        task.score(half, "<answer> 0.5 </answer>") == 1.0 and task.score(half, "<answer>0.4</answer>") == 0.0
    )
    assert task.score(paris, "<answer> paris. </answer>") == 1.0
    pytest.importorskip("sympy")
    assert task.score(expand, "<answer>(x+1)*(x+1)</answer>") == 1.0
    assert task.score(expand, "<answer>__import__('os')</answer>") == 0.0  # never reaches sympy's parser
    assert task.score(half, "<answer> 5e-1 </answer>") == 1.0
    import sympy

    monkeypatch.setattr(sympy, "simplify", lambda *a: pytest.fail("a huge power reached simplify"))
    from fractions import Fraction

    monkeypatch.setattr(
        "nanoseek.tasks.jsonl.Fraction",
        lambda t: pytest.fail("a huge exponent reached Fraction") if "e" in t else Fraction(t),
    )
    for hostile in ("1e999999999", "9^9^9", "((9^99)^99)^99", "2**x"):  # would take minutes, or all memory
        assert task.score(half, f"<answer>{hostile}</answer>") == 0.0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": 1}\n{"answer": 2}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: a record needs"):
        get_task(f"jsonl:{bad}")


def test_task_levels_suffix(tmp_path):
    rng = random.Random(0)
    task = get_task("arithmetic@1-2")
    assert task.difficulties == (1, 2)
    assert {task.sample(rng).difficulty for _ in range(50)} == {1, 2}
    assert get_task("countdown@3,4").difficulties == (3, 4) == get_task("countdown").difficulties
    easy = get_task("countdown@2")  # a level beyond the default mix
    for p in (easy.sample(rng) for _ in range(20)):
        assert len(p.data["numbers"]) == 2 and easy.score(p, easy.solution(p)) == 1.0
    with pytest.raises(ValueError, match="no difficulty level 9"):
        get_task("arithmetic@2,9")
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        get_task("nope@1")
    f = tmp_path / "a@b.jsonl"  # an @ inside a path is not a level suffix
    f.write_text('{"prompt": "p", "answer": "1", "difficulty": 2}\n')
    assert get_task(f"jsonl:{f}").difficulties == (2,)


def test_a_small_jsonl_task_holds_out_a_fifth_of_its_questions(tmp_path):
    from nanoseek.data import held_out_problems, training_problems

    f = tmp_path / "sixty.jsonl"
    f.write_text(
        "".join(json.dumps({"prompt": f"what is {i} + 1?", "answer": i + 1}) + "\n" for i in range(60))
    )
    held = held_out_problems(f"jsonl:{f}", 100, seed=0)
    assert len(held) == 12 == len({p.question for p in held})
    train = training_problems(get_task(f"jsonl:{f}"), random.Random(1), 500, {p.question for p in held})
    assert len({p.question for p in train}) == 48  # the other four fifths, all of them used
    assert len(held_out_problems("arithmetic", 100, seed=0)) == 100  # plenty of questions: as many as asked
    assert get_task("addition@1").size == 100 and get_task("arithmetic@1").size == 100 + 100 + 10 * 8
    assert len({p.question for p in held_out_problems("addition@1", 100, seed=0)}) == 20
