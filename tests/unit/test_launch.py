"""`chatrlhf launch`: the launcher command built from the options, the hostfile and the command, case by case."""

import pytest

from chatrlhf.cli import main
from chatrlhf.config import ConfigError
from chatrlhf.launch import (
    LaunchConfig,
    build_launch_command,
    is_loopback,
    launch_env,
    parse,
    parse_hostfile,
    split_argv,
)

TWO_NODES = "# the cluster\nw0 slots=8\n\nw1 slots=8\n"
TAIL = ["--no_local_rank", "--module", "chatrlhf.cli"]
SFT = ["sft", "--engine.zero_stage", "3"]

COMMANDS = {
    "one node, 8 GPUs": (
        LaunchConfig(num_gpus=8), None, SFT,
        ["deepspeed", "--num_gpus", "8", *TAIL, *SFT],
    ),
    "one node, every GPU (DeepSpeed's default)": (
        LaunchConfig(), None, ["train", "--sft.engine.zero_stage", "3"],
        ["deepspeed", *TAIL, "train", "--sft.engine.zero_stage", "3"],
    ),
    "two nodes from a hostfile": (
        LaunchConfig(num_gpus=8, hostfile="hosts", master_addr="10.0.0.1", master_port=29500), TWO_NODES, SFT,
        ["deepspeed", "--hostfile", "hosts", "--master_addr", "10.0.0.1", "--master_port", "29500", "--num_gpus",
         "8", *TAIL, *SFT],
    ),
    "two nodes, every option that goes with a hostfile": (
        LaunchConfig(num_gpus=4, num_nodes=2, hostfile="hosts", master_addr="node0.cluster", master_port=1234,
                     launcher="slurm"), TWO_NODES, ["ppo", "--actor_engine.zero_stage", "3"],
        ["deepspeed", "--hostfile", "hosts", "--num_nodes", "2", "--master_addr", "node0.cluster", "--master_port",
         "1234", "--launcher", "slurm", "--num_gpus", "4", *TAIL, "ppo", "--actor_engine.zero_stage", "3"],
    ),
    "first node of a hostfile only: no --master_addr needed": (
        LaunchConfig(num_nodes=1, hostfile="hosts"), TWO_NODES, ["dpo"],
        ["deepspeed", "--hostfile", "hosts", "--num_nodes", "1", *TAIL, "dpo"],
    ),
    "--exclude leaving one node: no --master_addr needed": (
        LaunchConfig(hostfile="hosts", exclude="w1"), TWO_NODES, ["rm"],
        ["deepspeed", "--hostfile", "hosts", "--exclude", "w1", *TAIL, "rm"],
    ),
    "--include over two nodes": (
        LaunchConfig(hostfile="hosts", include="w0:0,1@w1", master_addr="10.0.0.1"), TWO_NODES, ["grpo"],
        ["deepspeed", "--hostfile", "hosts", "--include", "w0:0,1@w1", "--master_addr", "10.0.0.1", *TAIL, "grpo"],
    ),
    "--include without a hostfile (GPUs of this machine)": (
        LaunchConfig(include="localhost:1,3"), None, SFT,
        ["deepspeed", "--include", "localhost:1,3", *TAIL, *SFT],
    ),
    "loopback --master_addr is fine on one node": (
        LaunchConfig(num_gpus=2, master_addr="127.0.0.1"), None, SFT,
        ["deepspeed", "--master_addr", "127.0.0.1", "--num_gpus", "2", *TAIL, *SFT],
    ),
}


@pytest.mark.parametrize("name", COMMANDS)
def test_build_launch_command(name):
    cfg, hostfile, argv, expected = COMMANDS[name]
    assert build_launch_command(cfg, argv, hostfile) == expected


ERRORS = {
    "no processes": (LaunchConfig(num_gpus=0), None, SFT, "--num_gpus must be >= 1"),
    "no nodes": (LaunchConfig(num_nodes=0), None, SFT, "--num_nodes must be >= 1"),
    "bad port": (LaunchConfig(master_port=70000), None, SFT, "--master_port must be a TCP port in 1..65535"),
    "nothing after --": (LaunchConfig(num_gpus=2), None, [], "no chatrlhf command after '--'"),
    "a flag instead of a command": (LaunchConfig(num_gpus=2), None, ["--engine.zero_stage", "3"],
                                    "'--engine.zero_stage' after '--' is not a chatrlhf training command"),
    "one-process command": (LaunchConfig(num_gpus=2), None, ["eval"], "chatrlhf eval runs in one process"),
    "several nodes without hostfile": (LaunchConfig(num_nodes=2), None, SFT, "--num_nodes 2 needs --hostfile"),
    "several nodes without master_addr": (LaunchConfig(hostfile="hosts"), TWO_NODES, SFT,
                                          "several nodes need --master_addr"),
    "loopback IPv4": (LaunchConfig(hostfile="hosts", master_addr="127.0.0.1"), TWO_NODES, SFT,
                      "--master_addr 127.0.0.1 is this machine's loopback address"),
    "localhost": (LaunchConfig(hostfile="hosts", master_addr="localhost"), TWO_NODES, SFT,
                  "--master_addr localhost is this machine's loopback address"),
    "unspecified address": (LaunchConfig(hostfile="hosts", master_addr="0.0.0.0"), TWO_NODES, SFT,
                            "--master_addr 0.0.0.0 is this machine's loopback address"),
    "bad hostfile line": (LaunchConfig(hostfile="hosts"), "w0 slots=8\nw1 slots=eight\n", SFT,
                          "--hostfile hosts line 2: 'w1 slots=eight' is not 'hostname slots=N'"),
    "host twice": (LaunchConfig(hostfile="hosts"), "w0 slots=8\n# again\nw0 slots=4\n", SFT,
                   "--hostfile hosts line 3: w0 is listed twice"),
    "zero slots": (LaunchConfig(hostfile="hosts"), "w0 slots=0\n", SFT, "--hostfile hosts line 1: w0 has slots=0"),
    "empty hostfile": (LaunchConfig(hostfile="hosts"), "# nothing\n\n", SFT, "--hostfile hosts lists no hosts"),
    "include and exclude": (LaunchConfig(include="localhost:0", exclude="localhost:1"), None, SFT,
                            "--include and --exclude cannot be combined"),
    "include with num_gpus": (LaunchConfig(include="localhost:0", num_gpus=1), None, SFT,
                              "--include picks the hosts and GPUs itself"),
    "exclude with num_nodes": (LaunchConfig(hostfile="hosts", exclude="w1", num_nodes=1), TWO_NODES, SFT,
                               "--exclude picks the hosts and GPUs itself"),
    "include names an unknown host": (LaunchConfig(hostfile="hosts", include="w2"), TWO_NODES, SFT,
                                      "--include w2: host 'w2' is not in ['w0', 'w1']"),
    "include names a missing GPU": (LaunchConfig(hostfile="hosts", include="w0:7,8"), TWO_NODES, SFT,
                                    "--include w0:7,8: w0 has GPUs 0..7, not [8]"),
    "include with a bad slot list": (LaunchConfig(hostfile="hosts", include="w0:a"), TWO_NODES, SFT,
                                     "--include w0:a: 'w0:a' is not NAME or NAME:SLOT,SLOT"),
    "include a remote host without hostfile": (LaunchConfig(include="w0:0"), None, SFT,
                                               "--include w0:0: without --hostfile the only host is 'localhost'"),
    "exclude everything": (LaunchConfig(hostfile="hosts", exclude="w0@w1"), TWO_NODES, SFT,
                           "--exclude w0@w1 leaves no GPU in --hostfile hosts"),
    "more nodes than hosts": (LaunchConfig(hostfile="hosts", num_nodes=3, master_addr="10.0.0.1"), TWO_NODES, SFT,
                              "--num_nodes 3 but --hostfile hosts lists 2 host(s)"),
    "more GPUs than slots": (LaunchConfig(hostfile="hosts", num_gpus=8, master_addr="10.0.0.1"),
                             "w0 slots=8\nw1 slots=4\n", SFT, "--num_gpus 8 but --hostfile hosts gives w1 slots=4"),
}


@pytest.mark.parametrize("name", ERRORS)
def test_build_launch_command_errors(name):
    cfg, hostfile, argv, message = ERRORS[name]
    with pytest.raises(ConfigError) as err:
        build_launch_command(cfg, argv, hostfile)
    assert message in str(err.value)
    assert "Fix:" in str(err.value) or "must be" in str(err.value) or "need" in str(err.value)


def test_hostfile_is_read_and_a_missing_one_named(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text(TWO_NODES)
    cfg = LaunchConfig(hostfile=str(hosts), master_addr="10.0.0.1")
    assert build_launch_command(cfg, ["sft"]) == ["deepspeed", "--hostfile", str(hosts), "--master_addr",
                                                  "10.0.0.1", *TAIL, "sft"]
    cfg.hostfile = str(tmp_path / "nope")
    with pytest.raises(ConfigError, match=f"--hostfile {tmp_path / 'nope'} does not exist"):
        build_launch_command(cfg, ["sft"])


def test_parse_hostfile_docstring_example():
    assert parse_hostfile("# nodes\nw0 slots=8\n\nw1 slots=4\n") == {"w0": 8, "w1": 4}
    assert list(parse_hostfile("b slots=1\na slots=2\n")) == ["b", "a"]  # file order = node rank order


@pytest.mark.parametrize(("addr", "loopback"), [
    ("127.0.0.1", True), ("127.0.1.1", True), ("::1", True), ("0.0.0.0", True), ("LOCALHOST", True),
    ("10.0.0.1", False), ("192.168.1.20", False), ("fe80::1", False), ("node0", False),
])  # fmt: skip
def test_is_loopback(addr, loopback):
    assert is_loopback(addr) is loopback


def test_launch_env_threads_per_process():
    assert launch_env(LaunchConfig(num_gpus=2), {}, 16) == {"OMP_NUM_THREADS": "8"}
    assert launch_env(LaunchConfig(num_gpus=3), {}, 2) == {"OMP_NUM_THREADS": "1"}  # never 0
    assert launch_env(LaunchConfig(num_gpus=2), {"OMP_NUM_THREADS": "4"}, 16) == {}  # the user's value stays
    assert launch_env(LaunchConfig(), {}, 16) == {}  # one per GPU: count unknown here


def test_split_and_parse():
    assert split_argv(["--num_gpus", "2", "--", "sft", "--", "x"]) == (["--num_gpus", "2"], ["sft", "--", "x"])
    with pytest.raises(ConfigError, match="must follow '--'"):
        split_argv(["--num_gpus", "2", "sft"])
    cfg, argv = parse(["--num_gpus", "2", "--launcher", "openmpi", "--dry_run", "true", "--", "sft"])
    assert (cfg.num_gpus, cfg.launcher, cfg.dry_run, cfg.hostfile, argv) == (2, "openmpi", True, None, ["sft"])


def test_cli_dry_run_prints_the_command(capsys, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("chatrlhf.launch._usable_cores", lambda: 4)
    argv = ["launch", "--dry_run", "true", "--num_gpus", "2", "--master_port", "29601", "--",
            "sft", "--engine.zero_stage", "2", "--data.datasets", "[a b.jsonl]"]
    assert main(argv) == 0
    assert capsys.readouterr().out == ("OMP_NUM_THREADS=2 deepspeed --master_port 29601 --num_gpus 2 --no_local_rank "
                                       "--module chatrlhf.cli sft --engine.zero_stage 2 --data.datasets '[a b.jsonl]'\n")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith("deepspeed --master_port 29601 ")


@pytest.mark.parametrize(("argv", "message"), [
    (["--num_gpus", "2", "--", "sft", "--engine.zero_stag", "3"],
     "unknown flag(s): --engine.zero_stag 3. Did you mean --engine.zero_stage?"),
    (["--num_gpus", "2", "--", "sft", "--engine.micro_batch_size", "0"], "engine.micro_batch_size must be >= 1"),
    (["--num_gpu", "2", "--", "sft"], "unrecognized arguments: --num_gpu 2"),
    (["--num_gpus", "2", "--master_addr", "127.0.0.1", "--num_nodes", "2", "--", "sft"],
     "--num_nodes 2 needs --hostfile"),
])  # fmt: skip
def test_cli_errors_are_one_line_before_launching(argv, message, capsys):
    assert main(["launch", "--dry_run", "true", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("chatrlhf launch: error: ") and captured.err.count("\n") == 1
    assert message in captured.err
