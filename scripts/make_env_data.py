"""Writes the shipped math environment data: src/chatrlhf/demo_data/math_{train,eval,sft}.jsonl.

The problems are ones a 135M-parameter model cannot reliably do in its head but a calculator can:
``arithmetic`` is a single operation on 2-4 digit numbers ("What is 347 * 29?", with exact integer results
for divisions); ``multi_step`` is a word problem of 2-3 steps (products of two 2-digit numbers, sums of 3-4
digit ones) from one of 18 templates (``TEMPLATES``). Each row keeps the calculator ``steps`` that solve it,
later steps using earlier results, and its ``answer`` computed here with Python integers (the tests check the
calculator gives the same).

Record fields: ``id`` (``arith-``/``multi-`` + 10 hex of sha1(prompt)), ``category``, ``prompt``, ``answer``
(text), ``steps``. No computation appears twice (so no problem is in both splits, however phrased). The eval
split is 65 % multi-step, the train split 2/3; in each, the templates take turns. ``math_sft.jsonl`` holds
300 tool-use demonstrations (1/3 arithmetic) built from train problems only: the calculator's system prompt,
the problem, one calculator call and its result per step, then "The answer is X.".

The output is deterministic (one seeded ``random.Random``): running it again writes byte-identical files.

Usage: python scripts/make_env_data.py [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from pathlib import Path

from chatrlhf.environments.calculator import CALCULATOR, evaluate
from chatrlhf.environments.tools import format_tool_call, plain_tool_prompt

SEED = 20250301
COUNTS = {"train": {"arithmetic": 500, "multi_step": 1000}, "eval": {"arithmetic": 70, "multi_step": 130}}
SFT_COUNTS = {"arithmetic": 100, "multi_step": 200}
"""300 demonstrations, not more: each repeats the ~430-byte tool prompt, and the three files stay < 600 KB."""
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "chatrlhf" / "demo_data"

NAMES = ("Ana", "Ben", "Chen", "Dana", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jade", "Kofi", "Lena", "Mia",
         "Noah", "Omar", "Priya", "Ravi", "Sara", "Tom", "Yuki")
GOODS = (("lamps", "chairs"), ("shirts", "hats"), ("pens", "notebooks"), ("mugs", "plates"), ("kites", "balls"),
         ("books", "maps"), ("rugs", "pillows"), ("bikes", "helmets"))
ARITHMETIC = {
    "*": ("What is {a} * {b}?", "Compute {a} * {b}.", "Calculate {a} times {b}.", "What is the product of {a} and {b}?"),
    "/": ("What is {a} / {b}?", "Compute {a} / {b}.", "What is {a} divided by {b}?", "Divide {a} by {b}."),
    "+": ("What is {a} + {b}?", "Compute {a} + {b}.", "What is the sum of {a} and {b}?", "Add {a} and {b}."),
    "-": ("What is {a} - {b}?", "Compute {a} - {b}.", "What is {a} minus {b}?", "Subtract {b} from {a}."),
}


def arithmetic(r: random.Random) -> tuple[str, list[str], int]:
    """One operation: 40 % products (3x2 or 2x2 digits), 25 % exact divisions, 20 % sums, 15 % differences."""
    op = r.choices("*/+-", weights=(40, 25, 20, 15))[0]
    if op == "*":
        a, b = r.randint(100, 999) if r.random() < 0.6 else r.randint(13, 99), r.randint(12, 99)
        value = a * b
    elif op == "/":
        b, value = r.randint(12, 99), r.randint(23, 999)
        a = b * value  # the dividend is built from the quotient, so the result is a whole number
    elif op == "+":
        a, b = r.randint(1000, 9999), r.randint(100, 9999)
        value = a + b
    else:
        a = r.randint(1000, 9999)
        b = r.randint(100, a - 1)
        value = a - b
    return r.choice(ARITHMETIC[op]).format(a=a, b=b), [f"{a} {op} {b}"], value


# Multi-step templates: each returns (prompt, steps, answer); intermediate values are computed with ints.

def shop(r):
    (x, y), n, p, m, q = r.choice(GOODS), r.randint(12, 48), r.randint(13, 89), r.randint(12, 39), r.randint(12, 97)
    return (f"A shop sells {n} {x} at ${p} each and {m} {y} at ${q} each. How many dollars does it take in?",
            [f"{n} * {p}", f"{m} * {q}", f"{n * p} + {m * q}"], n * p + m * q)


def train_trip(r):
    s, h, d = r.randint(42, 98), r.randint(12, 29), r.randint(105, 899)
    return (f"A train travels at {s} km per hour for {h} hours, then {d} km more. How many km does it travel?",
            [f"{s} * {h}", f"{s * h} + {d}"], s * h + d)


def savings(r):
    name, a, w = r.choice(NAMES), r.randint(15, 95), r.randint(12, 52)
    b = r.randint(101, min(999, a * w - 1))
    return (f"{name} saves ${a} a week for {w} weeks, then spends ${b} on a bike. How many dollars are left?",
            [f"{a} * {w}", f"{a * w} - {b}"], a * w - b)


def recipe(r):
    g, c, d = r.randint(120, 480), r.randint(12, 48), r.randint(3, 9)
    return (f"A cake needs {g} grams of flour. A bakery bakes {c} cakes a day for {d} days. "
            "How many grams of flour does it use?", [f"{g} * {c}", f"{g * c} * {d}"], g * c * d)


def field_area(r):
    length, width = r.randint(23, 99), r.randint(13, 89)
    barn = r.randint(101, min(999, length * width - 1))
    return (f"A field is {length} m long and {width} m wide. A barn covers {barn} square meters of it. "
            "How many square meters are left?",
            [f"{length} * {width}", f"{length * width} - {barn}"], length * width - barn)


def age_days(r):
    name, y, d = r.choice(NAMES), r.randint(12, 89), r.randint(12, 364)
    return (f"{name} is {y} years and {d} days old. Counting 365 days a year, how many days old is {name}?",
            [f"{y} * 365", f"{y * 365} + {d}"], y * 365 + d)


def theater(r):
    rows, seats = r.randint(14, 48), r.randint(16, 44)
    empty = r.randint(23, min(400, rows * seats - 1))
    return (f"A theater has {rows} rows of {seats} seats. At a show, {empty} seats are empty. "
            "How many people are watching?", [f"{rows} * {seats}", f"{rows * seats} - {empty}"],
            rows * seats - empty)


def salary(r):
    name, h, n, b = r.choice(NAMES), r.randint(14, 68), r.randint(40, 99), r.randint(105, 950)
    return (f"{name} earns ${h} an hour, works {n} hours this month and gets a ${b} bonus. "
            f"How many dollars does {name} earn this month?",
            [f"{h} * {n}", f"{h * n} + {b}"], h * n + b)


def cans(r):
    n, a, k = r.randint(12, 39), r.randint(13, 48), r.choice((12, 15, 16, 18, 20, 24, 25))
    b = k - (n * a) % k + k * r.randint(4, 30)  # makes n * a + b a multiple of k: whole boxes
    total = n * a + b
    return (f"{n} students each collect {a} cans, and a shop gives {b} more. The cans are packed {k} to a box. "
            "How many boxes are filled?", [f"{n} * {a}", f"{n * a} + {b}", f"{total} / {k}"], total // k)


def truck(r):
    t, c, w = r.randint(12, 35), r.randint(14, 48), r.randint(12, 45)
    return (f"A truck makes {t} trips with {c} crates each time. Each crate weighs {w} kg. "
            "How many kilograms does it carry in all?", [f"{t} * {c}", f"{t * c} * {w}"], t * c * w)


def library(r):
    a, b, c, d = r.randint(1200, 8999), r.randint(12, 38), r.randint(12, 36), r.randint(105, 999)
    return (f"A library has {a} books. It buys {b} boxes of {c} books and gives away {d} old books. "
            "How many books does it have now?", [f"{b} * {c}", f"{a} + {b * c}", f"{a + b * c} - {d}"],
            a + b * c - d)


def orchard(r):
    rows, trees, k = r.randint(12, 40), r.randint(13, 45), r.randint(21, 95)
    return (f"An orchard has {rows} rows of {trees} apple trees. Each tree gives {k} apples. "
            "How many apples is that?", [f"{rows} * {trees}", f"{rows * trees} * {k}"], rows * trees * k)


def tank(r):
    rate, minutes = r.randint(14, 75), r.randint(12, 95)
    size = r.randint(max(2000, rate * minutes + 101), 9999)
    return (f"A tank holds {size} liters. A pump drains {rate} liters a minute for {minutes} minutes. "
            "How many liters are left?", [f"{rate} * {minutes}", f"{size} - {rate * minutes}"],
            size - rate * minutes)


def buses(r):
    n, p, c, q = r.randint(12, 29), r.randint(36, 58), r.randint(12, 25), r.randint(12, 15)
    return (f"{n} buses carry {p} students each and {c} vans carry {q} students each. "
            "How many students go on the trip?", [f"{n} * {p}", f"{c} * {q}", f"{n * p} + {c * q}"],
            n * p + c * q)


def reading(r):
    name, per_day, days = r.choice(NAMES), r.randint(23, 75), r.randint(12, 29)
    pages = r.randint(per_day * days + 100, per_day * days + 2500)
    return (f"A book series has {pages} pages. {name} reads {per_day} pages a day for {days} days. "
            "How many pages are still unread?", [f"{per_day} * {days}", f"{pages} - {per_day * days}"],
            pages - per_day * days)


def factory(r):
    a, h, d = r.randint(23, 98), r.randint(12, 24), r.randint(13, 30)
    return (f"A factory makes {a} toys an hour, {h} hours a day. How many toys does it make in {d} days?",
            [f"{a} * {h}", f"{a * h} * {d}"], a * h * d)


def change(r):
    name, n, p = r.choice(NAMES), r.randint(12, 38), r.randint(13, 49)
    bill = (n * p // 100 + r.randint(1, 5)) * 100
    return (f"{name} buys {n} concert tickets at ${p} each and pays with ${bill}. How many dollars of change "
            "come back?", [f"{n} * {p}", f"{bill} - {n * p}"], bill - n * p)


def fence(r):
    length, width, cost = r.randint(120, 890), r.randint(105, 640), r.randint(12, 48)
    half = length + width
    return (f"A park is a rectangle {length} m by {width} m. A fence around it costs ${cost} per meter. "
            "How many dollars does the fence cost?", [f"{length} + {width}", f"2 * {half}", f"{2 * half} * {cost}"],
            2 * half * cost)


TEMPLATES = (shop, train_trip, savings, recipe, field_area, age_days, theater, salary, cans, truck, library,
             orchard, tank, buses, reading, factory, change, fence)


def make_rows(r: random.Random, category: str, n: int, seen: set) -> list[dict]:
    """``n`` new rows of ``category``; multi-step templates take turns so each is about equally common."""
    rows = []
    while len(rows) < n:
        make = arithmetic if category == "arithmetic" else TEMPLATES[len(rows) % len(TEMPLATES)]
        prompt, steps, answer = make(r)
        key = tuple(steps)
        if key in seen or prompt in seen:  # the same computation, however phrased, is made once
            continue
        seen.update((key, prompt))
        prefix = "arith" if category == "arithmetic" else "multi"
        rows.append({"id": f"{prefix}-{hashlib.sha1(prompt.encode()).hexdigest()[:10]}", "category": category,
                     "prompt": prompt, "answer": str(answer), "steps": steps})
    return rows


def demonstration(row: dict, system: str) -> dict:
    """The SFT messages for one problem: one calculator call per step, then "The answer is X."."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": row["prompt"]}]
    for step in row["steps"]:
        messages += [{"role": "assistant", "content": format_tool_call(CALCULATOR.name, {"expression": step})},
                     {"role": "tool", "content": evaluate(step)}]
    messages.append({"role": "assistant", "content": f"The answer is {row['answer']}."})
    return {"messages": messages}


def build(seed: int = SEED) -> dict[str, list[dict]]:
    """The three files' records. The eval split is made first, then train, sharing one set of computations
    already made, so no computation is in both; templates take turns within each split, so both hold every
    template about equally. The SFT demonstrations sample the train split."""
    r = random.Random(seed)
    seen: set = set()
    splits: dict[str, list[dict]] = {}
    for split in ("eval", "train"):
        splits[split] = [row for category, n in COUNTS[split].items() for row in make_rows(r, category, n, seen)]
        r.shuffle(splits[split])
    system = plain_tool_prompt([CALCULATOR])
    chosen = [row for category, n in SFT_COUNTS.items()
              for row in r.sample([x for x in splits["train"] if x["category"] == category], n)]
    r.shuffle(chosen)
    return {"math_train": splits["train"], "math_eval": splits["eval"],
            "math_sft": [demonstration(row, system) for row in chosen]}


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # compact separators: the files ship in the wheel, and this keeps all three under 600 KB
    lines = (json.dumps(x, ensure_ascii=False, separators=(",", ":")) + "\n" for x in records)
    path.write_text("".join(lines), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    for name, records in build().items():
        write_jsonl(args.out_dir / f"{name}.jsonl", records)
        print(f"wrote {len(records)} rows to {args.out_dir / name}.jsonl")


if __name__ == "__main__":
    main()
