"""The wheels bench/gpu_check.sh brings to the GPU machine, which has no network: fetch them here, install there.

    python bench/gpu_wheels.py fetch DIR     (here, with PyPI) download the wheels below for CPython 3.12 on
                                             manylinux x86_64 into DIR, build DeepSpeed's (an sdist) as a
                                             wheel, check the closure, print sizes; fails over 64 MiB
    python bench/gpu_wheels.py plan DIR      which wheels this interpreter's environment lacks, and why
    python bench/gpu_wheels.py install DIR   pip-install exactly those (--no-index --no-deps)

What is needed is decided by requirements, not by a fixed list: the roots are chatrlhf's own
(pyproject.toml's dependencies and build requirements, jsonargparse with its ``signatures`` extra, pytest);
a root or a requirement of a chosen wheel that the environment already satisfies is left alone (the GPU
machine's torch, transformers, numpy ... stay), anything else takes the wheel from DIR and, in turn, its
requirements. A requirement neither satisfied nor in DIR is printed as unresolved (not fatal: the check
then shows what breaks).

The list was chosen against the GPU image's package list (/work/.library/device/KINDS.md, 2026-11):
it has torch 2.11, transformers 5.17, peft, accelerate, safetensors, tensorboard, pandas, pyarrow,
matplotlib, jinja2, pyyaml, tqdm, pytest, einops, msgpack, ninja, psutil, py-cpuinfo, nvidia-ml-py, but
not DeepSpeed, pydantic, jsonargparse, datasets, gguf, vaderSentiment, fastapi or uvicorn.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
BUDGET_MIB = 64
DEEPSPEED = "deepspeed==0.19.8"
"""An sdist on PyPI: built here into a pure-Python wheel with no compiled ops (DS_BUILD_OPS unset), which
picks its accelerator (cuda there) at import. The Engine needs no op: torch's AdamW, no offload."""
WHEELS = [
    "hjson==3.1.0", "pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types==0.8.0",
    "typing-inspection==0.4.5", "typing-extensions==4.16.0",  # DeepSpeed's config, FastAPI
    "jsonargparse==4.53.0", "docstring-parser==0.18.0", "typeshed-client==2.15.0",  # the CLI
    "datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19", "fsspec==2026.9.0",  # hub/disk datasets
    "gguf==0.19.0", "vaderSentiment==3.3.2",  # the packaged model's loader, the sentiment rater
    "fastapi==0.136.3", "starlette==1.10.0", "annotated-doc==0.0.7", "uvicorn==0.55.0",
    "python-multipart==0.0.34",  # the feedback app
    "setuptools==78.1.1",  # pyproject's build backend (>= 77) for the editable install
]
EXTRA_ROOTS = ["jsonargparse[signatures]>=4.32", "pytest>=8"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"]
TARGET = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
          "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
          "platform_machine": "x86_64", "os_name": "posix"}
"""The GPU machine's interpreter, for evaluating markers at fetch time (here)."""
IMAGE = set("""absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs build
certifi charset-normalizer click cloudpickle cmake colorama contourpy coverage cycler cython einops filelock
fonttools frozenlist fsspec grpcio h11 hf-xet httpcore httpx huggingface-hub idna iniconfig jinja2 joblib
kiwisolver markdown markdown-it-py markupsafe matplotlib mdurl msgpack multidict networkx ninja numpy
nvidia-ml-py packaging pandas pathspec peft pillow pip pluggy protobuf psutil pyarrow py-cpuinfo pygments
pyparsing pytest pytest-timeout python-dateutil pyyaml regex requests rich safetensors sentencepiece
setuptools six sympy tensorboard tensorboard-data-server tokenizers torch tqdm transformers triton
typing-extensions urllib3 werkzeug wheel xxhash yarl zipp""".split())
"""Packages the GPU image has (KINDS.md, 2026-11-17; versions mostly unknown): fetch time treats them as
present; install time checks the real versions."""


@dataclass
class Wheel:
    path: Path
    name: str  # canonical
    version: Version
    requires: list[str] = field(default_factory=list)

    @property
    def mib(self) -> float:
        return self.path.stat().st_size / 2**20


def read_wheels(folder: Path) -> dict[str, Wheel]:
    """Canonical name -> the wheel of it in ``folder`` (Requires-Dist read from its METADATA)."""
    out = {}
    for path in sorted(folder.glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(path.name)
        with zipfile.ZipFile(path) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            lines = z.read(meta).decode("utf-8", "replace").splitlines()
        requires = [line.split(":", 1)[1].strip() for line in lines if line.startswith("Requires-Dist:")]
        if name in out:
            raise SystemExit(f"{folder} holds two wheels of {name}: {out[name].path.name}, {path.name}; keep one")
        out[name] = Wheel(path, name, version, requires)
    return out


def roots() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return project["build-system"]["requires"] + project["project"]["dependencies"] + EXTRA_ROOTS


def applies(req: Requirement, extras: set[str], env: dict | None) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**(env or {}), "extra": e}) for e in (extras or {""}))


def installed_version(name: str) -> Version | None:
    try:
        return Version(metadata.version(name))
    except metadata.PackageNotFoundError:
        return None


def resolve(wheels: dict[str, Wheel], present, env: dict | None = None) -> tuple[list[tuple], list[str]]:
    """Walks the requirements from ``roots()``. ``present(name, req)`` says whether the environment already
    satisfies ``req``. Returns ([(wheel, why)] to install, [unresolved requirement notes])."""
    chosen: dict[str, tuple] = {}
    unresolved: list[str] = []
    # Markers are evaluated when a requirement is queued, with the extras its parent was asked for.
    # (A second request for a chosen wheel with other extras is not followed: none of ours needs it.)
    queue = [(r, "chatrlhf") for r in map(Requirement, roots()) if applies(r, set(), env)]
    while queue:
        req, wanted_by = queue.pop(0)
        name = canonicalize_name(req.name)
        if name in chosen:
            continue
        if present(name, req):
            continue
        wheel = wheels.get(name)
        if wheel is None or not req.specifier.contains(wheel.version, prereleases=True):
            have = f"wheel {wheel.version}" if wheel else "no wheel"
            unresolved.append(f"{req} (wanted by {wanted_by}; {have} in the folder)")
            continue
        chosen[name] = (wheel, f"{req} (wanted by {wanted_by})")
        for line in wheel.requires:
            sub = Requirement(line)
            if applies(sub, set(req.extras) | {""}, env):
                queue.append((sub, name))
    return list(chosen.values()), unresolved


def present_here(name: str, req: Requirement) -> bool:
    have = installed_version(name)
    return have is not None and req.specifier.contains(have, prereleases=True)


def present_in_image(name: str, req: Requirement) -> bool:
    return name in IMAGE


def print_plan(plan: list[tuple], unresolved: list[str], image: bool = False) -> None:
    for wheel, why in plan:
        have = ("listed" if wheel.name in IMAGE else "absent") if image else installed_version(wheel.name)
        where = "in the image list" if image else "installed"
        print(f"  install {wheel.path.name:60s} {wheel.mib:6.2f} MiB  ({where}: {have or 'absent'}; {why})")
    for note in unresolved:
        print(f"  UNRESOLVED {note}")


def print_sizes(wheels: dict[str, Wheel]) -> float:
    total = sum(w.mib for w in wheels.values())
    for w in wheels.values():
        print(f"  {w.path.name:64s} {w.mib:6.2f} MiB")
    print(f"  {len(wheels)} wheels, {total:.2f} MiB in all (limit {BUDGET_MIB} MiB)")
    return total


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def fetch(dest: Path) -> int:
    dest.mkdir(parents=True, exist_ok=True)
    platforms = [x for p in PLATFORMS for x in ("--platform", p)]
    pip("download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
        *platforms, "-d", str(dest), *WHEELS)
    # --no-build-isolation: DeepSpeed's setup.py imports torch (this venv's); DS_BUILD_OPS unset = no ops.
    pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(dest), DEEPSPEED)
    wheels = read_wheels(dest)
    total = print_sizes(wheels)
    plan, unresolved = resolve(wheels, present_in_image, TARGET)
    print("against the GPU image's package list:")
    print_plan(plan, unresolved, image=True)
    unused = set(wheels) - {w.name for w, _ in plan}
    if unused:
        print(f"  not needed there by the list (kept in case the image lacks a version): {sorted(unused)}")
    if total > BUDGET_MIB:
        print(f"the wheels take {total:.1f} MiB, over the {BUDGET_MIB} MiB the device runner carries")
        return 1
    return 0


def install(folder: Path, dry_run: bool) -> int:
    wheels = read_wheels(folder)
    if not wheels:
        print(f"no wheels in {folder}: run bench/gpu_check.sh --fetch-wheels {folder} on a machine with PyPI")
        return 1
    plan, unresolved = resolve(wheels, present_here)
    print(f"{len(plan)} of {len(wheels)} wheels needed by this environment ({sys.executable}):")
    print_plan(plan, unresolved)
    if plan and not dry_run:
        # --ignore-installed: an older copy in the parent environment is shadowed, never uninstalled.
        pip("install", "--no-index", "--no-deps", "--ignore-installed", "--no-compile", "--quiet",
            *[str(w.path) for w, _ in plan])
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["fetch", "plan", "install", "sizes"])
    p.add_argument("folder", type=Path)
    args = p.parse_args(argv)
    if args.action == "fetch":
        return fetch(args.folder)
    if args.action == "sizes":
        print_sizes(read_wheels(args.folder))
        return 0
    return install(args.folder, dry_run=args.action == "plan")


if __name__ == "__main__":
    sys.exit(main())
