"""Five small HumanEval-style problems written for the pass@k harness.

Each has a prompt the model continues (signature and docstring, ending inside the
function), a ``check(candidate)`` test, and a reference solution that the tests use to
show the problems are solvable and the tests sound.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Problem:
    """One code-completion problem.

    Attributes:
      task_id: unique name.
      prompt: what the model continues (ends at the start of the function body).
      test: Python source defining ``check(candidate)`` with asserts.
      entry_point: the function ``check`` receives.
      canonical_solution: a body that passes (tests and documentation only).
    """

    task_id: str
    prompt: str
    test: str
    entry_point: str
    canonical_solution: str = ""


PROBLEMS: tuple[Problem, ...] = (
    Problem(
        task_id="neox/0_is_palindrome",
        prompt='def is_palindrome(text: str) -> bool:\n    """Whether text reads the same '
        "backwards, ignoring case and\n    anything that is not a letter or a digit.\n"
        '    >>> is_palindrome("A man, a plan, a canal: Panama")\n    True\n    """\n',
        canonical_solution="    kept = [c.lower() for c in text if c.isalnum()]\n"
        "    return kept == kept[::-1]\n",
        test="def check(f):\n"
        '    assert f("A man, a plan, a canal: Panama") is True\n'
        '    assert f("") is True\n'
        '    assert f("ab") is False\n'
        '    assert f("No lemon, no melon") is True\n'
        '    assert f("12321") and not f("12345")\n',
        entry_point="is_palindrome",
    ),
    Problem(
        task_id="neox/1_fizzbuzz",
        prompt="def fizzbuzz(n: int) -> list[str]:\n"
        '    """The numbers 1..n as strings, with multiples of 3 replaced by "Fizz",\n'
        '    of 5 by "Buzz" and of both by "FizzBuzz".\n'
        "    >>> fizzbuzz(5)\n    ['1', '2', 'Fizz', '4', 'Buzz']\n    \"\"\"\n",
        canonical_solution="    out = []\n    for i in range(1, n + 1):\n"
        '        word = ("Fizz" if i % 3 == 0 else "") + ("Buzz" if i % 5 == 0 else "")\n'
        "        out.append(word or str(i))\n    return out\n",
        test="def check(f):\n"
        '    assert f(5) == ["1", "2", "Fizz", "4", "Buzz"]\n'
        '    assert f(15)[-1] == "FizzBuzz"\n'
        "    assert f(0) == []\n"
        "    assert len(f(100)) == 100\n",
        entry_point="fizzbuzz",
    ),
    Problem(
        task_id="neox/2_running_sum",
        prompt="def running_sum(values: list[int]) -> list[int]:\n"
        '    """Prefix sums: element i is the sum of values[0..i].\n'
        '    >>> running_sum([1, 2, 3])\n    [1, 3, 6]\n    """\n',
        canonical_solution="    out, total = [], 0\n    for v in values:\n"
        "        total += v\n        out.append(total)\n    return out\n",
        test="def check(f):\n"
        "    assert f([1, 2, 3]) == [1, 3, 6]\n"
        "    assert f([]) == []\n"
        "    assert f([-1, 1, -1]) == [-1, 0, -1]\n"
        "    assert f([5]) == [5]\n",
        entry_point="running_sum",
    ),
    Problem(
        task_id="neox/3_count_vowels",
        prompt="def count_vowels(text: str) -> int:\n"
        '    """How many of the letters a, e, i, o, u (either case) text contains.\n'
        '    >>> count_vowels("Hello World")\n    3\n    """\n',
        canonical_solution='    return sum(c in "aeiouAEIOU" for c in text)\n',
        test="def check(f):\n"
        '    assert f("Hello World") == 3\n'
        '    assert f("") == 0\n'
        '    assert f("rhythm") == 0\n'
        '    assert f("AEIOUaeiou") == 10\n',
        entry_point="count_vowels",
    ),
    Problem(
        task_id="neox/4_flatten",
        prompt="def flatten(nested: list) -> list:\n"
        '    """All non-list items of an arbitrarily nested list, in order.\n'
        '    >>> flatten([1, [2, [3, 4]], 5])\n    [1, 2, 3, 4, 5]\n    """\n',
        canonical_solution="    out = []\n    for item in nested:\n"
        "        if isinstance(item, list):\n            out.extend(flatten(item))\n"
        "        else:\n            out.append(item)\n    return out\n",
        test="def check(f):\n"
        "    assert f([1, [2, [3, 4]], 5]) == [1, 2, 3, 4, 5]\n"
        "    assert f([]) == []\n"
        "    assert f([[[]]]) == []\n"
        '    assert f(["a", ["b"]]) == ["a", "b"]\n',
        entry_point="flatten",
    ),
)
