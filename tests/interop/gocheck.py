"""Building and running ``tlogcheck``, the Go check of the log's formats (test support).

``tlogcheck`` (tests/interop/tlogcheck/main.go) verifies a log's checkpoint, tiles and entries
with the Go project's reference code, golang.org/x/mod/sumdb/note and .../tlog, as Debian
packages them; it is built in GOPATH mode, so no module proxy is needed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).resolve().parent / "tlogcheck"
GOPATH = Path("/usr/share/gocode")
XMOD = GOPATH / "src" / "golang.org" / "x" / "mod" / "sumdb"
INSTALL = "apt-get install golang-go golang-golang-x-mod-dev"
#: The most output read back from one run (one JSON line is expected).
MAX_OUTPUT = 64 * 1024


class Missing(Exception):
    """Go or golang.org/x/mod is not installed."""


def build(out_dir: Path) -> Path:
    """Compile tlogcheck into ``out_dir``; raise :class:`Missing` or CalledProcessError."""
    go = shutil.which("go")
    if go is None:
        raise Missing(f"the go command is not installed: {INSTALL}")
    for package in ("note/note.go", "tlog/tile.go"):
        if not (XMOD / package).is_file():
            raise Missing(f"golang.org/x/mod is not at {XMOD} ({package} missing): {INSTALL}")
    binary = out_dir / "tlogcheck"
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": f"{GOPATH}:{out_dir / 'gopath'}",
           "GOCACHE": str(out_dir / "cache"), "GOFLAGS": "", "CGO_ENABLED": "0"}
    subprocess.run([go, "build", "-o", str(binary), "."], cwd=SOURCE, env=env, check=True,
                   capture_output=True, text=True, timeout=300)
    return binary


@dataclass(frozen=True)
class Outcome:
    """A run's exit status and the JSON object it printed."""

    returncode: int
    report: dict[str, Any]
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.report.get("ok") is True

    @property
    def error(self) -> str:
        return str(self.report.get("error", ""))


def run(binary: Path, base_url: str, vkey: Path, witness_vkeys: Sequence[Path] = (),
        quorum: int | None = None, old: tuple[int, str] | None = None, timeout: float = 300) -> Outcome:
    """``tlogcheck -vkey vkey -url base_url ...``; ``old`` is ``(size, base64 root)``."""
    args = [str(binary), "-vkey", str(vkey), "-url", base_url]
    for w in witness_vkeys:
        args += ["-witness-vkey", str(w)]
    if quorum is not None:
        args += ["-quorum", str(quorum)]
    if old is not None:
        args += ["-old-size", str(old[0]), "-old-root", old[1]]
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    lines = done.stdout[:MAX_OUTPUT].splitlines()
    if len(lines) != 1:
        raise AssertionError(f"tlogcheck printed {len(lines)} lines, not one JSON line: "
                             f"{done.stdout[:2000]!r}; stderr {done.stderr[:2000]!r}")
    report = json.loads(lines[0])
    if not isinstance(report, dict):
        raise AssertionError(f"tlogcheck printed {lines[0]!r}, not a JSON object")
    return Outcome(done.returncode, report, done.stderr)
