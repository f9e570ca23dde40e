"""How a step's rows are dealt to processes and cut into micro-batches (chatrlhf.data.micro_batches), by hand."""

import random

import pytest

from chatrlhf.data.micro_batches import RowSize, cost, deal, even_out, row_size, split, step_micro_batches
from chatrlhf.training import BatchPlan


def widths(*ws: int) -> list[RowSize]:
    return [RowSize(w, w) for w in ws]


def test_row_size_counts_every_sequence_of_an_item():
    assert row_size({"input_ids": [1, 2, 3], "labels": [1, 2, 3]}) == RowSize(3, 3)
    pair = {"chosen_input_ids": [1] * 5, "rejected_input_ids": [1] * 2, "prompt_len": 1}
    assert row_size(pair) == RowSize(7, 10)  # packed: 5 + 2; padded: two rows of 5
    assert row_size({"input_ids": [1] * 4, "kl_input_ids": [1] * 6}) == RowSize(10, 12)


def test_cost_padded_and_packed():
    sizes = [RowSize(7, 10), RowSize(3, 4), RowSize(5, 6)]
    assert cost([0, 1], sizes, packed=False) == 20  # 2 rows x widest 10
    assert cost([0, 1], sizes, packed=True) == 10  # 7 + 3 tokens
    assert cost([], sizes, packed=False) == 0


def test_deal_is_snake_order_longest_first():
    assert deal(widths(1, 5, 3, 4), 2) == [[1, 0], [3, 2]]  # 5 + 1 and 4 + 3
    assert deal(widths(6, 5, 4, 3, 2, 1), 3) == [[0, 5], [1, 4], [2, 3]]  # 7 tokens each
    assert deal(widths(3, 1, 2), 1) == [[0, 2, 1]]
    with pytest.raises(ValueError, match="evenly"):
        deal(widths(1, 2, 3), 2)


def test_split_by_rows_and_by_token_budget():
    sizes = widths(2, 9, 4, 3)
    assert split(range(4), sizes, micro_batch_size=2) == [[1, 2], [3, 0]]
    assert split(range(4), sizes, micro_batch_size=2, max_tokens=8) == [[1], [2, 3], [0]]  # 9 alone; 2 x 4; 2
    assert split(range(4), sizes, micro_batch_size=2, max_tokens=9, packed=True) == [[1], [2, 3, 0]]  # 4 + 3 + 2
    assert split([3, 0], sizes, micro_batch_size=1) == [[3], [0]]


def test_even_out_halves_the_costliest_micro_batch():
    sizes = widths(9, 4, 3, 2, 1)
    assert even_out([[0], [1, 2, 3, 4]], 3, sizes, packed=False) == [[0], [1, 2], [3, 4]]
    assert even_out([[0], [1, 2]], 2, sizes, packed=False) == [[0], [1, 2]]
    with pytest.raises(ValueError, match="cannot form"):
        even_out([[0], [1]], 3, sizes, packed=False)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_step_micro_batches_cover_each_row_once_with_equal_counts(world, packed):
    rng = random.Random(world)
    for _ in range(50):
        n = world * rng.randint(1, 8)
        sizes = widths(*(rng.randint(1, 40) for _ in range(n)))
        budget = rng.choice([0, 30, 60, 200])
        parts = [step_micro_batches(sizes, world, r, micro_batch_size=3, max_tokens=budget, packed=packed)
                 for r in range(world)]
        assert len({len(p) for p in parts}) == 1, parts  # every process runs the same number of forwards
        rows = sorted(i for p in parts for g in p for i in g)
        assert rows == list(range(n))
        assert {sum(len(g) for g in p) for p in parts} == {n // world}  # the same rows per process
        for p in parts:
            for g in p:
                assert g
                if budget == 0:
                    assert len(g) <= 3
                elif len(g) > 1 and len(p) == len(split(sum(p, []), sizes, 3, budget, packed)):
                    assert cost(g, sizes, packed) <= budget  # within the budget unless split to even out


def test_token_budget_balances_processes():
    sizes = widths(*range(1, 17))
    tokens = [sum(sizes[i].tokens for i in share) for share in deal(sizes, 2)]
    assert tokens == [68, 68]
    plan = BatchPlan(num_records=16, micro_batch_size=2, grad_accum=4, world_size=2, seed=0)
    items = [{"input_ids": [0] * s.tokens} for s in sizes]
    for rank in range(2):
        micro = plan.step_micro_batches(list(range(16)), rank, items, max_tokens=40, packed=True)
        assert all(sum(len(items[i]["input_ids"]) for i in g) <= 40 for g in micro)
