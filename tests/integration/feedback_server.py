"""Starts a real ``chatrlhf serve`` process on a tiny model for the browser and crash tests; the Chromium the
browser tests drive (its ``browser`` fixture is in conftest.py)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"  # Debian's (scripts/test.sh installs it)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
URL_LINE = re.compile(r"feedback app at (http://\S+)")


class Server:
    def __init__(self, db: Path, *extra: str, log: Path, timeout_s: float = 120):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        env.pop("CHATRLHF_TOKEN", None)
        cmd = [sys.executable, "-m", "chatrlhf.cli", "serve", "--model.name_or_path", "tiny-random-llama",
               "--db", str(db), "--port", "0", "--generation.max_new_tokens", "16", *extra]
        self.log, self.db = log, db
        self.proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if m := URL_LINE.search(log.read_text()):
                self.url = m.group(1)
                self.base = self.url.split("?")[0].rstrip("/")
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"chatrlhf serve exited with {self.proc.returncode}:\n{log.read_text()}")
            time.sleep(0.1)
        self.proc.kill()
        raise TimeoutError(f"chatrlhf serve printed no URL in {timeout_s} s:\n{log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
