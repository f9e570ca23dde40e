"""Our KTO loss against TRL's ``KTOTrainer`` on the same tiny models and the same tokens, mismatched KL rows
included.

TRL is a test-only dependency. Its trainer is built once (no training) and its own loss code is run on one
collated batch made from our encoded ids; our loss takes z0 from the same batch (TRL estimates it per
micro-batch; ``chatrlhf kto`` per optimizer step, which is the same thing when a step is one micro-batch).
"""

import pytest
import torch

from chatrlhf.algorithms.preference import kto, kto_reference_point
from chatrlhf.data import encode_records
from chatrlhf.models import load_causal_lm, load_tokenizer
from chatrlhf.models.tiny import build_tiny_llama
from chatrlhf.stages.kto import KL_KEY, Collate, _block, attach_kl_rows

trl = pytest.importorskip("trl")
pytestmark = pytest.mark.slow
BETA = 0.1
ROWS = [
    ("hello", "yes good dog", True),
    ("the quick brown fox", "a", False),
    ("what is the capital of france", "paris is the capital", True),
    ("copy: hello world", "world hello thanks", False),
    ("say yes", "yes yes", True),
]


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 1.33)])
def test_kto_loss_equals_trl(tmp_path, weights):
    from datasets import Dataset
    from trl import KTOConfig as TRLKTOConfig
    from trl import KTOTrainer
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    from chatrlhf.reference import answer_log_probs

    policy_dir, ref_dir = build_tiny_llama(tmp_path / "policy", seed=0), build_tiny_llama(tmp_path / "ref", seed=1)
    tok = load_tokenizer(policy_dir)
    rows = [{"prompt": [{"role": "user", "content": p}], "response": r, "label": y} for p, r, y in ROWS]
    items = encode_records(rows, "unpaired", tok, max_len=64, max_prompt_len=32)
    attach_kl_rows(items, max_len=64, seed=0)
    batch = Collate(tok.pad_token_id)(items)

    # bf16 autocast off (TRL's default would put its forward ~1e-4 relative off our float32 one)
    args = TRLKTOConfig(output_dir=str(tmp_path / "out"), beta=BETA, desirable_weight=weights[0],
                        undesirable_weight=weights[1], max_length=None, report_to="none", use_cpu=True, bf16=False,
                        save_strategy="no", disable_dropout=True, per_device_train_batch_size=len(items))
    trainer = KTOTrainer(model=load_causal_lm(policy_dir), ref_model=load_causal_lm(ref_dir), args=args,
                         train_dataset=Dataset.from_list([{"prompt": "hi", "completion": " yes", "label": True},
                                                          {"prompt": "yo", "completion": " no", "label": False}]),
                         processing_class=load_tokenizer(policy_dir))
    trainer.model.eval()
    examples = [{"prompt_ids": it["input_ids"][: it["prompt_len"]], "completion_ids": it["input_ids"][it["prompt_len"] :],
                 "KL_completion_ids": it[KL_KEY][it["prompt_len"] :], "label": it["label"]} for it in items]
    trl_batch = DataCollatorForUnpairedPreference(pad_token_id=tok.pad_token_id)(examples)
    with torch.no_grad():
        trl_loss = trainer._compute_loss(trainer.model, trl_batch, return_outputs=False)

        cpu = torch.device("cpu")
        policy, ref = load_causal_lm(policy_dir).eval(), load_causal_lm(ref_dir).eval()
        answers, mismatched = _block(batch, second=False), _block(batch, second=True)
        kl = answer_log_probs(policy, mismatched, cpu) - answer_log_probs(ref, mismatched, cpu)  # (P,)
        z0 = kto_reference_point(kl.sum(), torch.tensor(float(len(kl))))
        ratios = answer_log_probs(policy, answers, cpu) - answer_log_probs(ref, answers, cpu)
        ours = kto(ratios, batch["desirable"], z0, BETA, *weights).mean()
    assert z0 > 0  # the clamp does not hide the mismatched rows' estimate
    torch.testing.assert_close(ours, trl_loss.float(), rtol=1e-5, atol=0)
    print(f"KTO loss ours {ours.item():.9f} TRL {trl_loss.item():.9f} diff {abs(ours.item() - trl_loss.item()):.2e}")
