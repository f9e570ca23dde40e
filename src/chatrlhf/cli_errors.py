"""Command-line and YAML mistakes as one line that names the flag, file or key, and the fix.

``chatrlhf.cli`` parses with jsonargparse; what jsonargparse reports (``Parser key "engine.learning_rate":
Expected a <class 'float'>``), and what YAML files hold before jsonargparse reads them, are turned here into
the project's error style: ``--engine.learning_rate: bad value 'x': must be a value of type float ...``.
A write that fails on a full disk is worded here too (``disk_full_message``).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from argparse import ArgumentError
from pathlib import Path

from chatrlhf.config import ConfigError


def config_files(argv: list[str]) -> list[str]:
    """The values given to ``--config`` (``--config F`` or ``--config=F``), in order."""
    files = []
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def check_config_file(value: str):
    """Reads one ``--config`` file (or inline YAML) up front, through ``chatrlhf.limits``, so a missing file, a
    YAML syntax error, a key given twice, an alias bomb, a file that is not a mapping or not UTF-8 is
    reported with the file's name, line and column instead of jsonargparse's generic text."""
    import yaml

    from chatrlhf.limits import InputError, decode_utf8, load_yaml

    inline = "\n" in value or value.lstrip().startswith("{")
    path = Path(value).expanduser()
    if not inline and not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise ConfigError(f"--config {value} {what}. Fix: pass the path of a YAML file of options "
                          "(relative paths start at the working directory).")
    where = "--config (inline)" if inline else f"--config {value}"
    try:
        data = load_yaml(value if inline else decode_utf8(path.read_bytes(), where), where)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where} is not valid YAML: {problem}{at}. Fix: correct the YAML "
                          "syntax there (a mapping of option: value lines).") from None
    except InputError as err:
        raise ConfigError(str(err)) from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{where} holds a YAML {type(data).__name__}, not a mapping of options. "
                          "Fix: write option: value lines, e.g. 'engine:' then '  learning_rate: 1.0e-5'.")
    return data


def check_sections(data, cls, value: str, prefix: str = "") -> None:
    """A key that names a section of options (``engine``, ``ppo.actor_engine``) must hold a mapping: ``model:``
    with nothing under it (null) or a scalar cannot become a section."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not (isinstance(data, dict) and f.name in data and dataclasses.is_dataclass(hints.get(f.name))):
            continue
        section = data[f.name]
        if not isinstance(section, dict):
            shown = "null (nothing under it)" if section is None else f"a {type(section).__name__}"
            raise ConfigError(f"'{prefix}{f.name}' in --config {value} is {shown}, but it is a section of options. "
                              f"Fix: write its options under it (e.g. '{f.name}:' then '  seed: 1'), or remove it.")
        check_sections(section, hints[f.name], value, f"{prefix}{f.name}.")


def check_flag_values(argv: list[str]) -> None:
    """Flag values jsonargparse reads as YAML (``--data.datasets '[a, b]'``) go through the same limits
    (aliases, depth, duplicate keys) as a ``--config`` file."""
    import yaml

    from chatrlhf.limits import InputError, load_yaml

    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if not eq:
            flag, value = (argv[i - 1], arg) if i and argv[i - 1].startswith("--") else ("", "")
        if flag.startswith("--") and flag != "--config" and value.lstrip()[:1] in ("[", "{", "&", "!"):
            try:
                load_yaml(value, f"{flag} value")
            except yaml.YAMLError:
                pass  # jsonargparse reports the syntax error with the flag
            except InputError as err:
                raise ConfigError(str(err)) from None


def flag_names(cls, prefix: str = "") -> list[str]:
    """Every dotted option of a config dataclass: ``engine.learning_rate``, ``run.output_dir``, ..."""
    hints = typing.get_type_hints(cls)
    names = []
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        names.append(name)
        if dataclasses.is_dataclass(hints.get(f.name)):
            names += flag_names(hints[f.name], f"{name}.")
    return names


def did_you_mean(name: str, known: list[str], prefix: str = "") -> str:
    """`` Did you mean --engine.learning_rate?`` for the closest known name, or ""."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f" Did you mean {prefix}{close[0]}?" if close else ""


def yaml_has_key(value: str, key: str) -> bool:
    import yaml

    try:
        node = yaml.safe_load(Path(value).expanduser().read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return False
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def flag_or_key(key: str, got: str, argv: list[str]) -> str:
    """``--KEY`` when that flag gave the bad value, else the --config file(s) that set the key."""
    flag = f"--{key}"
    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg == flag and i + 1 < len(argv) else arg.partition("=")[2]
        if (arg == flag or arg.startswith(flag + "=")) and value == got:
            return flag
    files = [f for f in config_files(argv) if yaml_has_key(f, key)]
    return f"'{key}' in --config {', '.join(files)}" if files else flag


def source_of(key: str, argv: list[str]) -> str:
    """Where option ``key`` (dotted) was set: ``--KEY`` when given as a flag, else the --config file(s)
    that set it, else ``--KEY`` (a default, or a preset)."""
    flag = f"--{key.split('[')[0]}"
    if any(arg == flag or arg.startswith(flag + "=") for arg in argv):
        return f"--{key}"
    files = [f for f in config_files(argv) if yaml_has_key(f, key.split("[")[0])]
    return f"'{key}' in --config {', '.join(files)}" if files else f"--{key}"


def simplify_expected(text: str) -> str:
    """jsonargparse's ``Expected a typing.Literal[0, 1]`` / ``<class 'int'>`` in words."""
    text = re.sub(r"Expected a typing\.Literal\[(.*?)\]\.", r"must be one of \1.", text)
    return re.sub(r"Expected a <class '(\w+)'>\.", r"must be a value of type \1.", text)


def parse_error_message(err: ArgumentError, argv: list[str], command: str | None, known: list[str]) -> str:
    """One line naming the flag or YAML key (``known``: the command's options), what is wrong, and the fix."""
    msg = " ".join(str(err).split())
    help_hint = f"`chatrlhf {command} --help` lists the options" if command else "`chatrlhf --help` lists the commands"
    if m := re.match(r'Parser key "([^"]+)": (.*?)(?: Got value: (.*))?$', msg):
        key, problem, got = m.groups()
        where = flag_or_key(key, got or "", argv)
        bad = f" {got[:200]!r}{'...' if len(got) > 200 else ''}" if got is not None else ""
        return f"{where}: bad value{bad}: {simplify_expected(problem)} Fix: give a valid value ({help_hint})."
    if m := re.match(r"Subcommand '\w+' does not accept option '([^']+)'", msg):
        key = m.group(1)
        files = ", ".join(config_files(argv))
        return (f"unknown option '{key}' in --config {files}.{did_you_mean(key, known)} "
                f"Fix: correct or remove that key ({help_hint}).")
    if m := re.match(r"unrecognized arguments: (.*)", msg):
        flags = [a for a in m.group(1).split() if a.startswith("--")]
        guess = did_you_mean(flags[0][2:].split("=")[0], known, "--") if flags else ""
        return f"unknown flag(s): {m.group(1)}.{guess} Fix: correct or remove them ({help_hint})."
    return f"{msg.rstrip('.')}. Fix: correct the command line ({help_hint})."


def yaml_top_keys(value: str) -> list[str]:
    import yaml

    try:
        node = yaml.safe_load(Path(value).expanduser().read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError, ValueError):
        return []
    return [str(k) for k in node] if isinstance(node, dict) else []


# ----------------------------------------------------------------------------- a full disk
def _disk_full_errno(err: BaseException) -> int | None:
    """ENOSPC, EDQUOT or EFBIG behind ``err`` (or its causes): an OSError's errno, or the ``(os error N)`` that
    safetensors' Rust writer puts in its message (its exception carries no errno)."""
    import errno

    for _ in range(8):  # causes and contexts, a few deep
        code = err.errno if isinstance(err, OSError) else None
        if code is None and (m := re.search(r"\(os error (\d+)\)", str(err))):
            code = int(m.group(1))
        if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return code
        err = err.__cause__ or err.__context__
        if err is None:
            break
    return None


def _file_being_written(err: BaseException) -> str | None:
    """The file a failed write was writing. Python names it only when open() fails, and safetensors' error
    has no path, so the innermost frame that holds one tells: an open file object, or a ``filename`` argument
    (safetensors' ``save_file``)."""
    import traceback

    if isinstance(err, OSError) and err.filename:
        return str(err.filename)
    for frame, _ in reversed(list(traceback.walk_tb(err.__traceback__))):
        for value in frame.f_locals.values():
            if hasattr(value, "write") and isinstance(getattr(value, "name", None), str) and \
                    any(c in str(getattr(value, "mode", "")) for c in "wax+"):
                return value.name
        if isinstance(frame.f_locals.get("filename"), (str, os.PathLike)):
            return str(frame.f_locals["filename"])
    return None


def disk_full_message(err: BaseException, cfg) -> str | None:
    """One line for a write that failed because the disk (or quota, or file-size limit) is full; None for
    any other error. Saves are atomic, so the last complete checkpoint is intact: resuming is the fix."""
    import errno

    code = _disk_full_errno(err)
    if code is None:
        return None
    run = getattr(cfg, "run", None)
    out = getattr(run, "output_dir", None)
    what = _file_being_written(err) or f"a file under {out or 'the output dir'}"
    # EFBIG: the file outgrew a size limit, not the disk; a full disk is the usual reason to have one set.
    limit = ": past the file-size limit, ulimit -f, or the file system's largest file" if code == errno.EFBIG else ""
    fix = f"free space on the disk of {out or what}" + (" or raise that limit" if limit else "")
    if hasattr(run, "resume"):
        fix += ", then run the same command with --run.resume true: it continues from the last complete checkpoint"
    return f"could not write {what}: disk full ({os.strerror(code)}{limit}). Fix: {fix}."
