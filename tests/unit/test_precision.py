"""The precision policy (auto / fp32 / bf16 and its reasons) and the math of the rollout correction:
truncated importance sampling weights, the mismatch statistics and the weighted policy loss, by hand."""

import math

import pytest
import torch

from chatrlhf import precision as prec
from chatrlhf.algorithms import mismatch_stats, policy_loss, tis_weights


def test_explicit_choice_wins_over_env_and_hardware(monkeypatch):
    monkeypatch.setenv(prec.ENV, "bf16")
    p = prec.resolve_precision("fp32")
    assert (p.mode, p.reason, p.mixed, p.compute_dtype) == ("fp32", "--run.precision fp32", False, torch.float32)
    assert prec.resolve_precision("bf16").compute_dtype == torch.bfloat16


@pytest.mark.parametrize("flags, mode", [({"amx_bf16", "avx512f"}, "bf16"), ({"avx512_bf16"}, "bf16"),
                                         ({"avx2", "fma"}, "fp32"), (set(), "fp32")])
def test_auto_follows_the_cpu_flags(monkeypatch, flags, mode):
    monkeypatch.delenv(prec.ENV, raising=False)
    monkeypatch.setattr(prec, "cpu_flags", lambda: flags)
    p = prec.resolve_precision("auto", "cpu")
    assert p.mode == mode
    assert p.reason.startswith("auto: CPU ")
    assert ("has" in p.reason) == (mode == "bf16")


def test_env_overrides_auto_and_a_bad_value_names_the_variable(monkeypatch):
    monkeypatch.setattr(prec, "cpu_flags", lambda: {"amx_bf16"})
    monkeypatch.setenv(prec.ENV, "fp32")
    assert prec.resolve_precision("auto").reason == f"auto: {prec.ENV}=fp32"
    monkeypatch.setenv(prec.ENV, "half")
    with pytest.raises(ValueError, match=prec.ENV):
        prec.resolve_precision("auto")
    with pytest.raises(ValueError, match="--run.precision"):
        prec.resolve_precision("fp16")


def test_autocast_only_when_mixed():
    x, w = torch.randn(2, 3), torch.randn(3, 4)
    with prec.Precision("bf16", "test").autocast():
        assert (x @ w).dtype == torch.bfloat16
    with prec.Precision("fp32", "test").autocast():
        assert (x @ w).dtype == torch.float32


def test_tis_weights_by_hand():
    old = torch.tensor([[math.log(0.3), math.log(0.1), math.log(0.6)]])
    rollout = torch.tensor([[math.log(0.2), math.log(0.2), math.log(0.2)]])
    # p_train / p_rollout = 1.5, 0.5, 3 -> capped at 2
    torch.testing.assert_close(tis_weights(old, rollout, 2.0), torch.tensor([[1.5, 0.5, 2.0]]))


def test_weighted_policy_loss_by_hand():
    # The docstring example of policy_loss (eps 0.2): per-token terms -1.2, 0.8, -1.0, 2.2.
    ratio = torch.tensor([[1.5, 0.5, 0.5, 1.1]])
    adv = torch.tensor([[1.0, -1.0, 2.0, -2.0]])
    old = torch.zeros(1, 4)
    mask = torch.ones(1, 4)
    loss, _ = policy_loss(ratio.log(), old, adv, mask, 0.2)
    assert loss.item() == pytest.approx(0.2)
    w = torch.tensor([[2.0, 0.5, 1.0, 0.0]])
    loss, _ = policy_loss(ratio.log(), old, adv, mask, 0.2, weights=w)
    assert loss.item() == pytest.approx((2 * -1.2 + 0.5 * 0.8 - 1.0 + 0 * 2.2) / 4)


def test_weights_are_constants_of_the_gradient():
    logp = torch.zeros(1, 2, requires_grad=True)
    w = torch.tensor([[3.0, 0.5]], requires_grad=True)
    loss, _ = policy_loss(logp, torch.zeros(1, 2), torch.tensor([[1.0, 1.0]]), torch.ones(1, 2), 0.2, weights=w)
    loss.backward()
    # d/dlogp of -A * w * exp(logp - old) at ratio 1 = -A w / n; nothing flows into the weights
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.5, -0.25]]))
    assert w.grad is None


def test_mismatch_stats_by_hand():
    old = torch.tensor([[0.1, -0.3, 5.0]])  # log p_train
    rollout = torch.zeros(1, 3)  # log p_rollout
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third token is padding
    s = mismatch_stats(old, rollout, mask, cap=1.05)
    assert s["mismatch_kl"] == pytest.approx((-0.1 + 0.3) / 2)
    assert s["max_ratio"] == pytest.approx(math.exp(0.1))
    assert s["min_ratio"] == pytest.approx(math.exp(-0.3))
    assert s["tis_clipfrac"] == pytest.approx(0.5)  # e^0.1 = 1.105 > 1.05
    empty = mismatch_stats(old, rollout, torch.zeros(1, 3), cap=2.0)
    assert empty == {"mismatch_kl": 0.0, "max_ratio": 1.0, "min_ratio": 1.0, "tis_clipfrac": 0.0}
