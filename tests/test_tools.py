"""The calculator tool: values checked against Python's own arithmetic; refusals; bounds; threads."""

import threading
import time

import pytest

from nanochat.tools import MAX_EXPR_CHARS, CalculatorError, calculate, evaluate


@pytest.mark.parametrize("expr", ["1+2", "2*3+4", "(2+3)*4", "-5+2", "10/4", "10//4", "10%4", "-7//2", "-(3-10)",
                                  "2**10", "1.5*4", "0.1+0.2", "3 - -2", "+4", "((1+2)*(3+4))/7"])
def test_arithmetic_matches_python(expr):
    assert evaluate(expr) == eval(expr)  # the reference: Python itself, on these trusted literals


def test_results_are_formatted_like_gsm8k_annotations():
    assert calculate("48/2") == "24"  # not "24.0"
    assert calculate("7/2") == "3.5"
    assert calculate("1/3") == "0.3333333333"
    assert calculate("1,200*3") == "3600"  # thousands separators
    assert calculate("  5 * 6 ") == "30"


def test_letter_counting():
    assert calculate('"strawberry".count("r")') == "3"
    assert calculate("'Mississippi'.lower().count('s')") == "4"
    assert calculate('"banana".count("an")') == "2"


@pytest.mark.parametrize("expr", [
    "__import__('os').system('true')", "open('/etc/passwd').read()", "x+1", "(1).__class__",
    "[1, 2][0]", "'a' * 10", "'ab' + 'c'", "len('abc')", '"abc".replace("a", "b")', "lambda: 1", "1 if 1 else 2",
    "1/0", "5 % 0", "2**100000", "10**31", "9**9**9", "1e308*10", "0**-1", "(-8)**0.5", "", "   ", "1 +",
    "True + 1", "'abc'.count()", "'abc'.count(1)", "(1).count('a')", "-'a'",
])
def test_refused_expressions_give_none(expr):
    assert calculate(expr) is None
    with pytest.raises(CalculatorError):
        evaluate(expr)


def test_size_bounds_refuse_quickly():
    t0 = time.perf_counter()
    assert calculate("1+" * (MAX_EXPR_CHARS // 2) + "1") is None  # too long
    assert calculate("-" * (MAX_EXPR_CHARS - 1) + "1") is None  # too many nodes
    assert calculate("(" * 250 + "1" + ")" * 250) is None  # too long
    assert calculate("(" * 100 + "1" + ")" * 100) == "1"  # deep but within bounds
    assert calculate("99999999999999**2*99999999") is None  # would pass 1e30
    assert time.perf_counter() - t0 < 1.0


def test_thread_safe_and_no_signals():
    """Many threads at once (the web server's workers): each gets its own correct answer."""
    results, errors = {}, []

    def work(i):
        try:
            for j in range(50):
                assert calculate(f"{i}*{j}+1") == str(i * j + 1)
            results[i] = calculate(f"'{'a' * i}b'.count('a')")
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == {i: str(i) for i in range(8)}
