"""The answer checker (environments/answers.py): every form of answer, worked out by hand."""

import time
from fractions import Fraction

import pytest

from chatrlhf.environments.answers import extract_answer, is_correct, last_boxed, parse_number

EXTRACT = [
    # \boxed: the last one, nested braces kept, its number read
    (r"The result is \boxed{42}.", "42"),
    (r"First \boxed{7}, no wait: \boxed{9}", "9"),
    (r"$\boxed{\frac{3}{4}}$", "3/4"),
    (r"\boxed{-\frac{1}{2}}", "-1/2"),
    (r"\boxed{\dfrac{10}{4}}", "10/4"),
    (r"\boxed{1{,}239}", "1239"),
    (r"\boxed{x = 5}", "5"),
    (r"\boxed{42 \text{ apples}}", "42"),
    (r"\boxed{yes}", "yes"),  # a box with no number: its text, an answer that is wrong against a number
    (r"The answer is 12. \boxed{13}", "13"),  # a box beats a marker
    (r"\boxed{5} then \boxed{6", "5"),  # the last box is cut off (token limit): the complete one counts
    (r"\boxed{}  the answer is 8", "8"),  # an empty box is no answer: the marker is next
    # markers: answer: / the answer is / Answer = ; the last one; the number in its sentence
    ("The answer is 1081.", "1081"),
    ("answer: 77", "77"),
    ("ANSWER = 3", "3"),
    ("Final Answer: the answer is -12", "-12"),
    ("The answer is 5. Wait, the answer is 6.", "6"),
    ("The answer is 42, which is 6 times 7.", "42"),
    ("Answer: 12 + 30 = 42 apples", "42"),
    ("The answer is 1081. Then 158 more make 1239", "1081"),
    ("The answer is $-2.50.", "-2.50"),
    ("the answer is: **17**", "17"),
    ("The answer is seven. I counted 3 and 4", "4"),  # no number after the marker: the last number
    # the last number
    ("23 * 47 = 1081 and 1081 + 158 = 1239", "1239"),
    ("I have 3 apples and 7 pears", "7"),
    ("It costs $12.", "12"),
    ("That is 45% of them", "45"),
    ("profit = -300 dollars", "-300"),
    ("The difference is 800 - 500", "500"),  # a minus after a number is subtraction
    ("answers: −12", "-12"),  # U+2212; "answers" is no marker, so the last number
    ("about .5 liters", ".5"),
    ("he ran 2.75 km", "2.75"),
    ("so 3/4 of the cake", "3/4"),
    ("so 8136 / 24 = 339", "339"),
    # thousands separators, and lists that are not
    ("The total is 1,234,567 dollars", "1234567"),
    ("In all 1,239.", "1239"),
    ("The total is 12,345.5", "12345.5"),
    ("the list 1,2,3", "3"),
    ("the numbers 1, 2, 3", "3"),
    ("1,2345", "2345"),
    # nothing to read
    ("I don't know.", None),
    ("", None),
]


@pytest.mark.parametrize(("reply", "expected"), EXTRACT)
def test_extract_answer(reply, expected):
    assert extract_answer(reply) == expected


PARSE = [
    ("1239", Fraction(1239)),
    ("1,234", Fraction(1234)),
    ("-7", Fraction(-7)),
    ("2.50", Fraction(5, 2)),
    (".5", Fraction(1, 2)),
    ("3/4", Fraction(3, 4)),
    ("-3/4", Fraction(-3, 4)),
    (r"\frac{3}{4}", Fraction(3, 4)),
    ("1.5/3", Fraction(1, 2)),
    ("$12.", Fraction(12)),
    ("45%", Fraction(45)),
    ("17 km", Fraction(17)),
    (" 42 \n", Fraction(42)),
    ("3/0", None),
    ("1, 2", None),
    ("x = 5", None),
    ("12 apples and 3 pears", None),
    ("", None),
    ("seven", None),
    ("1" * 101, None),  # too long to be an answer (and int() refuses over 4,300 digits)
]


@pytest.mark.parametrize(("text", "expected"), PARSE)
def test_parse_number(text, expected):
    assert parse_number(text) == expected


CORRECT = [
    ("The answer is 1239.", "1239", True),
    ("The answer is 1,239.", "1239", True),
    (r"\boxed{\frac{5}{2}}", "2.5", True),
    ("The answer is 2.50", "5/2", True),  # a finite decimal equals its fraction exactly
    ("The answer is 5/2", "2.50", True),
    ("The answer is -3", "-3", True),
    ("The answer is 1238.", "1239", False),  # wrong answer
    ("The answer is 3", "-3", False),
    ("The answer is 0.333", "1/3", False),  # no tolerance: 0.333 is not 1/3
    ("The answer is 0.333333", "1/3", False),
    ("I don't know", "7", False),  # no answer
    ("The answer is 7 or 8", "8", False),  # the first number after the marker, not any of them
    ("1,2,3", "123", False),  # a list, not one hundred twenty-three
    (r"\boxed{yes}", "5", False),
]


@pytest.mark.parametrize(("reply", "gold", "expected"), CORRECT)
def test_is_correct(reply, gold, expected):
    assert is_correct(reply, gold) is expected


def test_gold_that_is_no_number_is_a_data_error():
    with pytest.raises(ValueError, match=r"gold answer 'yes' is not a number .* fix the row's 'answer' column"):
        is_correct("The answer is yes", "yes")


def test_last_boxed():
    assert last_boxed(r"a \boxed{1} b \fbox{{2}}") == "{2}"
    assert last_boxed("no box") is None
    assert last_boxed(r"\boxed{unclosed") is None
    assert last_boxed(r"\boxed{\boxed{1}}") == r"\boxed{1}"  # nested: the box closing last is the outer one
    assert last_boxed(r"} \boxed{2} }") == "2"  # a stray closing brace is no box's


def test_long_reply_is_fast():
    """A 100 KB reply (several times any episode's token budget) takes milliseconds, not seconds: no regex
    here backtracks badly."""
    replies = ["12 apples " * 10_000, "1," * 50_000, "a" * 100_000 + "!", r"\boxed{" * 10_000, "-" * 100_000]
    for reply in replies:
        start = time.perf_counter()
        extract_answer(reply)
        parse_number(reply)
        assert time.perf_counter() - start < 0.5, reply[:20]
