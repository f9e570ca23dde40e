"""Padding-free packing (chatrlhf.data.packing) on hand-worked batches."""

import torch

from chatrlhf.data.packing import (
    best_fit_decreasing,
    block_causal_mask,
    pack,
    pack_labels,
    packed_inputs,
    plan_packing,
    row_sums,
    unpack,
)


def test_best_fit_decreasing_by_hand():
    # 9 alone (full); 5 opens a bin, 4 fits beside it (room 4 -> 0); 3 fits nowhere: a third bin
    assert best_fit_decreasing([5, 9, 3, 4], 9) == [[1], [0, 3], [2]]
    # best fit, not first fit: 2 goes to the bin with room 2 (after 6), not the one with room 4 (after 4)
    assert best_fit_decreasing([6, 4, 2], 8) == [[0, 2], [1]]
    assert best_fit_decreasing([12, 1], 8) == [[0], [1]]  # a row longer than the capacity gets its own bin


def mixed_batch():
    """Right-padded rows of lengths 2, 4, 1 and a left-padded row of length 3, width 4."""
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [0, 1, 1, 1]])
    ids = torch.tensor([[11, 12, 0, 0], [21, 22, 23, 24], [31, 0, 0, 0], [0, 41, 42, 43]])
    return ids, mask


def test_plan_pack_and_unpack_by_hand():
    ids, mask = mixed_batch()
    plan = plan_packing(mask, capacity=4)
    # lengths [2, 4, 1, 3], capacity 4: 4 alone; 3 opens a bin, 1 joins it (room 0); 2 opens a third
    assert plan.bins == ((1,), (2, 3), (0,)) and plan.packed_width == 4
    packed = pack(plan, ids, fill=-1)
    assert packed.tolist() == [[21, 22, 23, 24], [31, 41, 42, 43], [11, 12, -1, -1]]
    assert plan.position.tolist() == [[0, 1, 2, 3], [0, 0, 1, 2], [0, 1, 0, 0]]
    assert plan.segment.tolist() == [[1, 1, 1, 1], [2, 3, 3, 3], [0, 0, -1, -1]]
    assert torch.equal(unpack(plan, packed, fill=0), ids)  # the round trip restores every real token
    assert plan.padding_fraction() == (1 - 10 / 16, 1 - 10 / 12)


def test_block_causal_mask_by_hand():
    _, mask = mixed_batch()
    plan = plan_packing(mask, capacity=4)
    m = block_causal_mask(plan)[:, 0].int()  # (K, L, L)
    # packed row 1 = [row 2 (1 token) | row 3 (3 tokens)]: row 3 never sees row 2
    assert m[1].tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 1, 1, 1]]
    # packed row 2 = [row 0 (2 tokens) | padding]: padding attends to itself only
    assert m[2].tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]


def test_labels_and_row_sums():
    ids, mask = mixed_batch()
    plan = plan_packing(mask, capacity=4)
    labels = torch.where(mask.bool(), ids, torch.tensor(-100))
    # a row's first token is nobody's target: in packed row 1, 41 would otherwise follow row 2's 31
    assert pack_labels(plan, labels, -100).tolist() == [[-100, 22, 23, 24], [-100, -100, 42, 43],
                                                        [-100, 12, -100, -100]]
    values = pack(plan, mask.float() * torch.arange(1.0, 5.0), fill=100.0)  # padding must not count
    assert row_sums(plan, values).tolist() == [1 + 2, 1 + 2 + 3 + 4, 1, 2 + 3 + 4]
    inputs = packed_inputs(plan, ids, pad_id=0)
    assert inputs["attention_mask"].shape == (3, 1, 4, 4) and inputs["input_ids"][2, 2:].tolist() == [0, 0]
    assert packed_inputs(plan, ids, pad_id=0, flash=True)["attention_mask"] is None


def test_default_capacity_is_the_width():
    _, mask = mixed_batch()
    assert plan_packing(mask).bins == plan_packing(mask, capacity=4).bins
