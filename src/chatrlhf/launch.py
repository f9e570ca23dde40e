"""``chatrlhf launch``: run a training command on several processes, GPUs or nodes through DeepSpeed's launcher.

    chatrlhf launch --num_gpus 8 -- sft --engine.zero_stage 3 ...
    chatrlhf launch --hostfile hosts --master_addr 10.0.0.1 -- train --sft.engine.zero_stage 3 ...

becomes ``deepspeed [launcher options] --no_local_rank --module chatrlhf.cli <command> ...``, which
starts one ``chatrlhf`` process per GPU (on a CPU machine: ``--num_gpus N`` processes over gloo) on every
node. Everything after ``--`` is the chatrlhf command, passed through unchanged; it is parsed and
validated here first, so a mistake in it stops in one process, with one line, before N processes start.

``build_launch_command`` holds the logic (a function of the options, the command and the hostfile's text,
checked case by case in tests/unit/test_launch.py); ``main`` reads the hostfile, prints the command with
``--dry_run true``, else replaces this process with the launcher (``os.execvp``).

Nothing here imports torch or DeepSpeed.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from chatrlhf.config import ConfigError

LAUNCHABLE = ("sft", "rm", "ppo", "grpo", "dpo", "kto", "ilql", "train")
"""The chatrlhf commands that train on several processes (the others, ``eval``, ``chat`` and ``pairs``,
run in one process: start them directly)."""

_HOSTFILE_LINE = re.compile(r"^(\S+)\s+slots=(\d+)\s*$")


@dataclass
class LaunchConfig:
    """Start a chatrlhf training command on several processes, GPUs or nodes through DeepSpeed's launcher:
    ``chatrlhf launch [options] -- <command> [its flags]``."""

    num_gpus: int | None = None
    """Processes per node, one per GPU (on a CPU machine: that many processes over gloo). None: every GPU
    of each node (DeepSpeed's default; on a CPU machine give a number)."""
    num_nodes: int | None = None
    """Use the first N hosts of ``hostfile``. None: every host in it (one node without a hostfile)."""
    hostfile: str | None = None
    """MPI-style host list, one ``hostname slots=N`` line per node (N GPUs there; ``#`` starts a comment).
    Needed for more than one node; all nodes must see the same paths (venv, data, output dir)."""
    include: str = ""
    """Only these hosts/GPUs, DeepSpeed's syntax: ``worker-0@worker-1:0,2`` (all of worker-0, GPUs 0 and 2 of
    worker-1); ``localhost:0,1`` without a hostfile. Not with ``exclude``, ``num_gpus`` or ``num_nodes``."""
    exclude: str = ""
    """All hosts/GPUs except these (same syntax as ``include``)."""
    master_addr: str | None = None
    """Address of the first node that every node can reach (its cluster-network IP or hostname); required
    for more than one node. One node: unused (the launcher takes the loopback address)."""
    master_port: int | None = None
    """TCP port of the rendezvous on ``master_addr``. None: DeepSpeed's default, 29500; give another when
    two runs share a node."""
    launcher: Literal["pdsh", "openmpi", "mvapich", "slurm", "mpich", "impi"] | None = None
    """How the launcher reaches the other nodes. None: DeepSpeed's default, pdsh (passwordless ssh)."""
    dry_run: bool = False
    """Print the command (and the environment it sets) and exit without running it."""


# ----------------------------------------------------------------------------- pure pieces
def parse_hostfile(text: str, name: str = "hostfile") -> dict[str, int]:
    """``hostname slots=N`` lines -> ``{hostname: N}`` in file order; blank lines and ``#`` comments skipped.

    The same format DeepSpeed reads, checked line by line so an error names the line:
    ``parse_hostfile("# nodes\\nw0 slots=8\\n\\nw1 slots=4\\n") == {"w0": 8, "w1": 4}``.
    """
    hosts: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _HOSTFILE_LINE.match(line)
        if match is None:
            raise ConfigError(f"--hostfile {name} line {number}: {line!r} is not 'hostname slots=N'. "
                              "Fix: write one 'hostname slots=<GPUs on that host>' per line.")
        host, slots = match.group(1), int(match.group(2))
        if slots < 1:
            raise ConfigError(f"--hostfile {name} line {number}: {host} has slots={slots}. Fix: give the number "
                              "of GPUs on that host (>= 1), or remove the line.")
        if host in hosts:
            raise ConfigError(f"--hostfile {name} line {number}: {host} is listed twice. Fix: keep one line per "
                              "host.")
        hosts[host] = slots
    if not hosts:
        raise ConfigError(f"--hostfile {name} lists no hosts. Fix: write one 'hostname slots=N' line per node.")
    return hosts


def _filter_hosts(hosts: dict[str, int], include: str, exclude: str) -> dict[str, int]:
    """Hosts left after ``--include`` / ``--exclude`` (``NAME[:SLOT,...]@...``), each with its GPU count."""
    flag, spec = ("--include", include) if include else ("--exclude", exclude)
    if not spec:
        return dict(hosts)
    picked: dict[str, set[int]] = {}
    for node in spec.split("@"):
        host, _, slot_text = node.partition(":")
        if host not in hosts:
            raise ConfigError(f"{flag} {spec}: host {host!r} is not in {sorted(hosts)}. Fix: name hosts from the "
                              "hostfile (without a hostfile the only host is 'localhost').")
        try:
            slots = {int(s) for s in slot_text.split(",")} if slot_text else set(range(hosts[host]))
        except ValueError:
            raise ConfigError(f"{flag} {spec}: {node!r} is not NAME or NAME:SLOT,SLOT. Fix: e.g. "
                              f"'{host}:0,1'.") from None
        bad = sorted(s for s in slots if not 0 <= s < hosts[host])
        if bad:
            raise ConfigError(f"{flag} {spec}: {host} has GPUs 0..{hosts[host] - 1}, not {bad}. Fix: name GPUs "
                              "that exist there.")
        picked.setdefault(host, set()).update(slots)
    if include:
        return {h: len(picked[h]) for h in hosts if h in picked}
    left = {h: n - len(picked.get(h, set())) for h, n in hosts.items()}
    return {h: n for h, n in left.items() if n > 0}


def is_loopback(addr: str) -> bool:
    """True for addresses other nodes cannot reach: ``localhost``, 127.0.0.0/8, ::1, 0.0.0.0 and ::.

    ``is_loopback("127.0.1.1") and not is_loopback("10.0.0.1")``
    """
    if addr.lower() in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False  # a hostname: other nodes may well resolve it
    return ip.is_loopback or ip.is_unspecified


def _check_options(cfg: LaunchConfig) -> None:
    """The option checks that need neither the hostfile nor the command."""
    if cfg.num_gpus is not None and cfg.num_gpus < 1:
        raise ConfigError(f"--num_gpus must be >= 1 (processes per node), got {cfg.num_gpus}")
    if cfg.num_nodes is not None and cfg.num_nodes < 1:
        raise ConfigError(f"--num_nodes must be >= 1, got {cfg.num_nodes}")
    if cfg.master_port is not None and not 1 <= cfg.master_port <= 65535:
        raise ConfigError(f"--master_port must be a TCP port in 1..65535, got {cfg.master_port}")
    if cfg.include and cfg.exclude:
        raise ConfigError("--include and --exclude cannot be combined. Fix: give one of them.")
    if (cfg.include or cfg.exclude) and (cfg.num_gpus is not None or cfg.num_nodes is not None):
        flag = "--include" if cfg.include else "--exclude"
        raise ConfigError(f"{flag} picks the hosts and GPUs itself; DeepSpeed refuses it together with --num_gpus "
                          f"or --num_nodes. Fix: drop --num_gpus/--num_nodes, or drop {flag}.")


def _check_command(stage_argv: list[str]) -> None:
    if not stage_argv:
        raise ConfigError("no chatrlhf command after '--'. Fix: e.g. chatrlhf launch --num_gpus 8 -- sft "
                          "--engine.zero_stage 2 ...")
    command = stage_argv[0]
    if command not in LAUNCHABLE:
        if command in ("eval", "chat", "pairs"):
            raise ConfigError(f"chatrlhf {command} runs in one process. Fix: run it directly: chatrlhf {command} ...")
        raise ConfigError(f"{command!r} after '--' is not a chatrlhf training command. Fix: start the part after "
                          f"'--' with one of: {', '.join(LAUNCHABLE)}.")


def _nodes(cfg: LaunchConfig, hosts: dict[str, int] | None) -> int:
    """How many nodes the run spans, after checking the hostfile against the options."""
    if hosts is None:
        if cfg.num_nodes is not None and cfg.num_nodes > 1:
            raise ConfigError(f"--num_nodes {cfg.num_nodes} needs --hostfile: a file with one 'hostname slots=N' "
                              "line per node.")
        for node in filter(None, (cfg.include or cfg.exclude).split("@")):
            if node.partition(":")[0] != "localhost":
                flag = "--include" if cfg.include else "--exclude"
                raise ConfigError(f"{flag} {cfg.include or cfg.exclude}: without --hostfile the only host is "
                                  f"'localhost', not {node.partition(':')[0]!r}. Fix: e.g. {flag} localhost:0,1, or "
                                  "pass --hostfile.")
        return 1
    active = _filter_hosts(hosts, cfg.include, cfg.exclude)
    if not active:
        raise ConfigError(f"--exclude {cfg.exclude} leaves no GPU in --hostfile {cfg.hostfile}. Fix: exclude less.")
    if cfg.num_nodes is not None:
        if cfg.num_nodes > len(active):
            raise ConfigError(f"--num_nodes {cfg.num_nodes} but --hostfile {cfg.hostfile} lists {len(active)} "
                              "host(s). Fix: lower --num_nodes or add hosts.")
        active = dict(list(active.items())[: cfg.num_nodes])
    if cfg.num_gpus is not None:
        short = {h: n for h, n in active.items() if n < cfg.num_gpus}
        if short:
            host, slots = next(iter(short.items()))
            raise ConfigError(f"--num_gpus {cfg.num_gpus} but --hostfile {cfg.hostfile} gives {host} slots={slots}. "
                              "Fix: lower --num_gpus or correct the slots.")
    return len(active)


def build_launch_command(cfg: LaunchConfig, stage_argv: list[str], hostfile_text: str | None = None) -> list[str]:
    """The launcher command line for ``chatrlhf <stage_argv>`` on the processes/nodes ``cfg`` names.

    ``hostfile_text`` is the content of ``cfg.hostfile`` (read by the caller); without it the file is
    read here. Raises ``ConfigError`` naming the flag (or hostfile line) and the fix. Example:
    ``LaunchConfig(num_gpus=8)``, ``["sft", "--engine.zero_stage", "3"]`` ->
    ``["deepspeed", "--num_gpus", "8", "--no_local_rank", "--module", "chatrlhf.cli", "sft",
    "--engine.zero_stage", "3"]``.
    """
    _check_options(cfg)
    _check_command(stage_argv)
    hosts = None
    if cfg.hostfile is not None:
        if hostfile_text is None:
            hostfile_text = read_hostfile(cfg.hostfile)
        hosts = parse_hostfile(hostfile_text, cfg.hostfile)
    if _nodes(cfg, hosts) > 1:
        if not cfg.master_addr:
            raise ConfigError("several nodes need --master_addr. Fix: pass the address of the first node that every "
                              "node can reach (its cluster-network IP or hostname).")
        if is_loopback(cfg.master_addr):
            raise ConfigError(f"--master_addr {cfg.master_addr} is this machine's loopback address, which the other "
                              "nodes cannot reach. Fix: give the first node's cluster-network IP or hostname.")
    cmd = ["deepspeed"]
    for flag, value in (("--hostfile", cfg.hostfile), ("--include", cfg.include or None),
                        ("--exclude", cfg.exclude or None), ("--num_nodes", cfg.num_nodes),
                        ("--master_addr", cfg.master_addr), ("--master_port", cfg.master_port),
                        ("--launcher", cfg.launcher), ("--num_gpus", cfg.num_gpus)):
        if value is not None:
            cmd += [flag, str(value)]
    # --no_local_rank: the process reads LOCAL_RANK from its environment (the launcher sets it); --module
    # runs `python -m chatrlhf.cli` with the interpreter the launcher itself runs under.
    return [*cmd, "--no_local_rank", "--module", "chatrlhf.cli", *stage_argv]


def launch_env(cfg: LaunchConfig, environ: dict[str, str], cores: int) -> dict[str, str]:
    """Variables to add to the launcher's environment (which every local process inherits).

    ``OMP_NUM_THREADS = max(1, cores // processes per node)`` when unset: N processes that each start one
    thread per core oversubscribe the machine and every step gets many times slower. Nothing when the user
    set it, or when the per-node process count is unknown (``num_gpus`` None: one per GPU).
    ``launch_env(LaunchConfig(num_gpus=2), {}, 16) == {"OMP_NUM_THREADS": "8"}``.
    """
    if "OMP_NUM_THREADS" in environ or cfg.num_gpus is None:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, cores // cfg.num_gpus))}


# ----------------------------------------------------------------------------- the command
def read_hostfile(path: str) -> str:
    p = Path(path).expanduser()
    if not p.is_file():
        what = "is a directory" if p.is_dir() else "does not exist"
        raise ConfigError(f"--hostfile {path} {what}. Fix: pass a file with one 'hostname slots=N' line per node.")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"--hostfile {path} is not UTF-8 text ({err.reason}).") from None


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """``[launch options..., "--", command...]`` -> (launch options, command); no ``--``: an error."""
    if "--" not in argv:
        raise ConfigError("the chatrlhf command must follow '--'. Fix: chatrlhf launch [options] -- sft ...")
    i = argv.index("--")
    return argv[:i], argv[i + 1 :]


def build_parser():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="chatrlhf launch", description=LaunchConfig.__doc__, exit_on_error=False,
                            allow_abbrev=False)
    parser.add_class_arguments(LaunchConfig, as_group=False)
    return parser


def parse(argv: list[str]) -> tuple[LaunchConfig, list[str]]:
    """``chatrlhf launch`` arguments -> (LaunchConfig, the chatrlhf command after ``--``)."""
    from argparse import ArgumentError

    options, stage_argv = split_argv(argv)
    parser = build_parser()
    try:
        ns = parser.parse_args(options)
    except ArgumentError as err:
        msg = " ".join(str(err).split())
        raise ConfigError(f"{msg.rstrip('.')}. Fix: correct the launch options (`chatrlhf launch --help` lists "
                          "them).") from None
    init = parser.instantiate(ns)
    return LaunchConfig(**{k: init[k] for k in LaunchConfig.__dataclass_fields__}), stage_argv


def _launcher_path() -> str:
    """The ``deepspeed`` script beside this interpreter (a venv's bin/), else the one on PATH."""
    found = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or shutil.which("deepspeed")
    if found is None:
        raise ConfigError("the deepspeed launcher is not installed beside this Python or on PATH. Fix: install "
                          "DeepSpeed into this environment (pip install deepspeed).")
    return found


def run(argv: list[str], check_command: Callable[[list[str]], None]) -> None:
    """``chatrlhf launch ARGS``: checks, then prints (``--dry_run``) or execs the launcher. Raises ConfigError.

    ``check_command`` parses and validates the chatrlhf command after ``--`` (the CLI passes its own check,
    so this module needs nothing from the CLI above it)."""
    options = argv[: argv.index("--")] if "--" in argv else argv
    if not argv or "-h" in options or "--help" in options:
        build_parser().print_help()
        return
    cfg, stage_argv = parse(argv)
    cmd = build_launch_command(cfg, stage_argv)
    # The command's own flags, checked once here: a mistake stops before N processes each report it.
    check_command(stage_argv)
    env = launch_env(cfg, dict(os.environ), _usable_cores())
    if cfg.dry_run:
        print(" ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(cmd)]))
        return
    launcher = _launcher_path()
    os.environ.update(env)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp(launcher, [launcher, *cmd[1:]])


def _usable_cores() -> int:
    """Cores this process may run on (the affinity mask, which containers narrow), not the host's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1
