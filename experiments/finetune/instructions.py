"""The experiment's instruction set: arithmetic, word reversal and capital cities.

Every answer is deterministic. Held-out questions (other sums, other words) measure
generalisation; capitals are facts, so they are only trained and asked back.
"""

import json
from pathlib import Path

TRAIN_WORDS = (  # noqa: SIM905 (a word list reads better as one string)
    "apple river stone cloud tiger lemon house chair plant music light sugar table water "
    "green bread clock dream earth flame grape heart jelly knife laser mouse night ocean "
    "piano queen robot snake train uncle voice whale yacht zebra brick candle"
).split()
TEST_WORDS = "garden pencil silver rocket window forest violin castle mirror planet".split()  # noqa: SIM905

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Japan": "Tokyo",
    "China": "Beijing",
    "India": "New Delhi",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Argentina": "Buenos Aires",
    "Canada": "Ottawa",
    "Mexico": "Mexico City",
    "Russia": "Moscow",
    "Greece": "Athens",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Poland": "Warsaw",
    "Austria": "Vienna",
    "Ireland": "Dublin",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "Cuba": "Havana",
    "Iran": "Tehran",
    "Turkey": "Ankara",
    "Australia": "Canberra",
    "Denmark": "Copenhagen",
}


def _sums() -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    pairs = [(a, b) for a in range(1, 10) for b in range(1, 10)]
    test = pairs[4::8][:10]  # every 8th pair from the 5th: spread over the table
    return [p for p in pairs if p not in test][:60], test


def questions() -> dict[str, list[tuple[str, str, str]]]:
    """``{"train": [...], "test": [...]}`` of ``(kind, question, answer)``."""
    train_sums, test_sums = _sums()
    add = lambda a, b: ("add", f"What is {a} plus {b}?", str(a + b))  # noqa: E731
    rev = lambda w: ("reverse", f"Reverse the word {w}.", w[::-1])  # noqa: E731
    cap = lambda c: ("capital", f"What is the capital of {c}?", CAPITALS[c])  # noqa: E731
    return {
        "train": [add(*p) for p in train_sums]
        + [rev(w) for w in TRAIN_WORDS]
        + [cap(c) for c in CAPITALS],
        "test": [add(*p) for p in test_sums] + [rev(w) for w in TEST_WORDS],
    }


def write(directory: Path) -> dict[str, Path]:
    """Chat-format jsonl files (one user turn, one assistant turn per line)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, items in questions().items():
        lines = [
            json.dumps(
                {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            )
            for _, q, a in items
        ]
        paths[split] = directory / f"{split}.jsonl"
        paths[split].write_text("\n".join(lines) + "\n")
    return paths
