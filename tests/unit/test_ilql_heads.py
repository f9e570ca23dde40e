"""ILQL heads: shapes, frozen target copies that move only by Polyak averaging, and the safetensors round trip."""

import json

import pytest
import torch

from chatrlhf.models.ilql import CONFIG_FILE, WEIGHTS_FILE, ILQLHeads

H, V = 4, 7


def _heads(two_qs=True, seed=0):
    torch.manual_seed(seed)
    return ILQLHeads(hidden_size=H, vocab_size=V, two_qs=two_qs)


def test_shapes_and_layers():
    heads = _heads()
    out = heads(torch.randn(2, 5, H))
    assert [q.shape for q in out.qs] == [(2, 5, V)] * 2
    assert [q.shape for q in out.target_qs] == [(2, 5, V)] * 2
    assert out.v.shape == (2, 5)
    # Linear(H, 2H) -> ReLU -> Linear(2H, out)
    assert [m.weight.shape for m in heads.q_heads[0] if isinstance(m, torch.nn.Linear)] == [(2 * H, H), (V, 2 * H)]
    assert [m.weight.shape for m in heads.v_head if isinstance(m, torch.nn.Linear)] == [(2 * H, H), (1, 2 * H)]


def test_init_is_deterministic_given_the_seed():
    a, b, c = _heads(seed=3), _heads(seed=3), _heads(seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.v_head[0].weight, c.v_head[0].weight)
    assert not torch.equal(a.q_heads[0][0].weight, a.q_heads[1][0].weight)  # the two Q heads differ


def test_targets_start_equal_and_get_no_gradient():
    heads = _heads()
    hidden = torch.randn(2, 3, H, requires_grad=True)
    out = heads(hidden)
    for online, target in zip(out.qs, out.target_qs):
        assert torch.equal(online, target)
        assert not target.requires_grad
    assert all(not p.requires_grad for p in heads.target_q_heads.parameters())
    (sum(q.sum() for q in out.qs) + out.v.sum()).backward()
    assert all(p.grad is None for p in heads.target_q_heads.parameters())
    assert all(p.grad is not None for p in heads.trainable_parameters())
    n_online = sum(p.numel() for p in heads.q_heads.parameters()) + sum(p.numel() for p in heads.v_head.parameters())
    assert sum(p.numel() for p in heads.trainable_parameters()) == n_online


def test_sync_targets_moves_by_alpha():
    heads = _heads()
    with torch.no_grad():
        for p in heads.q_heads.parameters():
            p.add_(1.0)  # online = old target + 1
    old = [p.clone() for p in heads.target_q_heads.parameters()]
    heads.sync_targets(0.25)  # target = old + 0.25 * (online - old) = old + 0.25
    for before, after in zip(old, heads.target_q_heads.parameters()):
        torch.testing.assert_close(after, before + 0.25, rtol=1e-6, atol=1e-7)
    heads.sync_targets(1.0)
    assert all(torch.equal(a, b) for a, b in zip(heads.target_q_heads.parameters(), heads.q_heads.parameters()))
    assert all(not p.requires_grad for p in heads.target_q_heads.parameters())


def test_save_load_round_trip(tmp_path):
    heads = _heads()
    with torch.no_grad():
        heads.q_heads[0][0].weight.add_(1.0)  # online and target differ: both must survive the trip
    heads.save(tmp_path)
    assert json.loads((tmp_path / CONFIG_FILE).read_text()) == {"hidden_size": H, "vocab_size": V, "two_qs": True}
    loaded = ILQLHeads.load(tmp_path, hidden_size=H, vocab_size=V, two_qs=True)
    assert loaded.state_dict().keys() == heads.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), heads.state_dict().values()))
    assert all(not p.requires_grad for p in loaded.target_q_heads.parameters())
    assert all(p.requires_grad for p in loaded.trainable_parameters())
    hidden = torch.randn(1, 2, H)
    assert torch.equal(loaded(hidden).qs[0], heads(hidden).qs[0])


def test_load_refuses_a_mismatch(tmp_path):
    _heads().save(tmp_path)
    with pytest.raises(ValueError, match=rf"{CONFIG_FILE}.*'vocab_size' is 7 but 9"):
        ILQLHeads.load(tmp_path, vocab_size=9)
    with pytest.raises(ValueError, match=rf"{CONFIG_FILE}.*'two_qs'"):
        ILQLHeads.load(tmp_path, two_qs=False)
    # a config that does not match the weights: the weights file and the tensor are named
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"hidden_size": H, "vocab_size": 8, "two_qs": True}))
    with pytest.raises(ValueError, match=rf"{WEIGHTS_FILE}: tensor 'q_heads.0.2.bias' has shape \(7,\).*gives \(8,\)"):
        ILQLHeads.load(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"hidden_size": True, "vocab_size": V, "two_qs": True}))
    with pytest.raises(ValueError, match=rf"{CONFIG_FILE}: field 'hidden_size'"):
        ILQLHeads.load(tmp_path)


def test_one_q_mode(tmp_path):
    heads = _heads(two_qs=False)
    out = heads(torch.randn(1, 3, H))
    assert len(out.qs) == len(out.target_qs) == 1 and len(heads.target_q_heads) == 1
    heads.save(tmp_path)
    with pytest.raises(ValueError, match=rf"{WEIGHTS_FILE}: missing tensor 'q_heads.1"):
        (tmp_path / CONFIG_FILE).write_text(json.dumps({"hidden_size": H, "vocab_size": V, "two_qs": True}))
        ILQLHeads.load(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps(heads.config()))
    assert torch.equal(ILQLHeads.load(tmp_path, two_qs=False).q_heads[0][2].bias, heads.q_heads[0][2].bias)
