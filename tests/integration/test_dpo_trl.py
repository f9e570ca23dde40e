"""Our DPO loss and per-answer log-probs against TRL's ``DPOTrainer`` on the same tiny model and the same tokens.

TRL is a test-only dependency. Its trainer is built once (no training) and its own loss code is run on one
collated batch made from our encoded ids, so both sides see exactly the same tokens.
"""

import pytest
import torch

from chatrlhf.algorithms.preference import dpo_sigmoid, ipo, preference_logits
from chatrlhf.data import PairCollator, encode_records
from chatrlhf.models import load_causal_lm, load_tokenizer
from chatrlhf.models.tiny import build_tiny_llama
from chatrlhf.reference import answer_log_probs

trl = pytest.importorskip("trl")
pytestmark = pytest.mark.slow
BETA = 0.1
ROWS = [
    ("hello", "yes good dog", "no"),
    ("the quick brown fox", "a", "lazy dog bad answer"),
    ("what is the capital of france", "paris is the capital", "the quick brown fox jumps"),
    ("copy: hello world", "hello world", "world hello thanks"),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from datasets import Dataset
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    root = tmp_path_factory.mktemp("trl")
    policy_dir, ref_dir = build_tiny_llama(root / "policy", seed=0), build_tiny_llama(root / "ref", seed=1)
    tok = load_tokenizer(policy_dir)
    rows = [{"prompt": [{"role": "user", "content": p}], "chosen": c, "rejected": r} for p, c, r in ROWS]
    items = encode_records(rows, "preference", tok, max_len=64, max_prompt_len=32)
    batch = PairCollator(pad_id=tok.pad_token_id)(items)  # (2P, T), chosen rows first

    # TRL patches its models' forward (a fused LM head), so it gets its own copies of the same weights. Its config
    # turns bf16 autocast on by default, which would put its forward ~1e-4 relative off our float32 one: off here.
    args = TRLDPOConfig(output_dir=str(root / "out"), beta=BETA, loss_type=["sigmoid"], precompute_ref_log_probs=False,
                        max_length=None, report_to="none", use_cpu=True, bf16=False, save_strategy="no",
                        disable_dropout=True)
    trainer = DPOTrainer(model=load_causal_lm(policy_dir), ref_model=load_causal_lm(ref_dir), args=args,
                         train_dataset=Dataset.from_list([{"prompt": "hi", "chosen": " yes", "rejected": " no"}]),
                         processing_class=load_tokenizer(policy_dir))
    trainer.model.eval()
    examples = [{"prompt_ids": it["chosen_input_ids"][: it["prompt_len"]],
                 "chosen_ids": it["chosen_input_ids"][it["prompt_len"] :],
                 "rejected_ids": it["rejected_input_ids"][it["prompt_len"] :]} for it in items]
    trl_batch = DataCollatorForPreference(pad_token_id=tok.pad_token_id)(examples)
    # the same tokens and padding on both sides; TRL's completion mask is our answer: prompt after, EOS included
    assert torch.equal(trl_batch["input_ids"], batch["input_ids"])
    assert torch.equal(trl_batch["attention_mask"], batch["attention_mask"])

    cpu = torch.device("cpu")
    with torch.no_grad():
        ours = answer_log_probs(load_causal_lm(policy_dir).eval(), batch, cpu)  # (2P,)
        ours_ref = answer_log_probs(load_causal_lm(ref_dir).eval(), batch, cpu)
    return {"trainer": trainer, "trl_batch": trl_batch, "ours": ours, "ours_ref": ours_ref, "pairs": len(items)}


def test_log_probs_equal_trl(setup):
    trainer, trl_batch, p = setup["trainer"], setup["trl_batch"], setup["pairs"]
    with torch.no_grad():
        # TRL's per-answer summed log-probs; its "reference" helper runs whichever model it is given
        trl_policy = torch.cat(trainer.compute_ref_log_probs(trainer.model, trl_batch))  # (2P,) chosen first
        trl_ref = torch.cat(trainer.compute_ref_log_probs(trainer.ref_model, trl_batch))
    torch.testing.assert_close(setup["ours"], trl_policy.float(), rtol=1e-5, atol=0)
    torch.testing.assert_close(setup["ours_ref"], trl_ref.float(), rtol=1e-5, atol=0)
    assert setup["ours"].shape == (2 * p,) and not torch.equal(setup["ours"], setup["ours_ref"])


def test_dpo_loss_equals_trl(setup):
    trainer, trl_batch, p = setup["trainer"], setup["trl_batch"], setup["pairs"]
    trainer.loss_types, trainer.loss_weights = ["sigmoid"], [1.0]
    with torch.no_grad():
        trl_loss = trainer._compute_loss(trainer.model, trl_batch, return_outputs=False)
    chosen, rejected = setup["ours"].split(p)
    ref_chosen, ref_rejected = setup["ours_ref"].split(p)
    ours = dpo_sigmoid(preference_logits(chosen, rejected, ref_chosen, ref_rejected), BETA).mean()
    torch.testing.assert_close(ours, trl_loss.float(), rtol=1e-5, atol=0)
    # TRL logs the same implicit-reward margin we log as rewards/margin
    margin = BETA * ((chosen - ref_chosen) - (rejected - ref_rejected)).mean()
    assert trainer._metrics["eval"]["rewards/margins"][-1] == pytest.approx(margin.item(), rel=1e-5)


def test_trl_ipo_is_ours_on_per_token_means(setup):
    """TRL's IPO divides each answer's log-ratio by its length; ours follows the paper (Azar et al. eq. 17) on
    summed log-probs. Fed per-token means, our ``ipo`` gives TRL's number: the difference is only that choice."""
    trainer, trl_batch, p = setup["trainer"], setup["trl_batch"], setup["pairs"]
    trainer.loss_types, trainer.loss_weights = ["ipo"], [1.0]
    try:
        with torch.no_grad():
            trl_loss = trainer._compute_loss(trainer.model, trl_batch, return_outputs=False)
    finally:
        trainer.loss_types = ["sigmoid"]
    lengths = trl_batch["completion_mask"].sum(1).float()  # (2P,) answer tokens, EOS included
    ratio = (setup["ours"] - setup["ours_ref"]) / lengths
    h_mean = ratio[:p] - ratio[p:]
    torch.testing.assert_close(ipo(h_mean, BETA).mean(), trl_loss.float(), rtol=1e-5, atol=0)
    h_sum = preference_logits(*setup["ours"].split(p), *setup["ours_ref"].split(p))
    assert ipo(h_sum, BETA).mean().item() != pytest.approx(trl_loss.item(), rel=1e-3)


def test_simpo_and_orpo_equal_trl():
    """SimPO against TRL's CPOTrainer.cpo_loss (loss_type "simpo") and ORPO's odds-ratio term against
    ORPOTrainer.odds_ratio_loss, run on the same mean per-token log-probs (their trainers' own methods,
    called on a stand-in holding the settings they read). TRL's ORPO loss is its NLL minus that term's mean."""
    from types import SimpleNamespace

    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    from chatrlhf.algorithms.preference import orpo, simpo

    g = torch.Generator().manual_seed(0)
    chosen, rejected = -torch.rand(16, generator=g) * 3 - 0.01, -torch.rand(16, generator=g) * 3 - 0.01
    cpu = SimpleNamespace(device=torch.device("cpu"))
    cpo = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=0.5, beta=2.0, label_smoothing=0.0, accelerator=cpu)
    trl_simpo = CPOTrainer.cpo_loss(cpo, chosen, rejected)[0]
    torch.testing.assert_close(simpo(chosen, rejected, 2.0, 0.5), trl_simpo, rtol=1e-6, atol=1e-7)
    trl_term = ORPOTrainer.odds_ratio_loss(SimpleNamespace(beta=0.1, accelerator=cpu), chosen, rejected)[0]
    torch.testing.assert_close(orpo(chosen, rejected, 0.1), -chosen - trl_term, rtol=1e-6, atol=1e-6)
