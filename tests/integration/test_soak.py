"""scripts/soak.py, run for a few seconds as CI does: everything delivered once, in order.

The script starts its own broker and worker processes and bounds every wait
itself (``--seconds + --grace``); the subprocess timeout here is only a
backstop above that bound.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SOAK = ROOT / "scripts" / "soak.py"
GRACE = 20.0


def soak(tmp_path: Path, *args: str, seconds: float) -> tuple[int, dict[str, Any], str]:
    """Run the script; its exit status, its JSON figures and its output."""
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(SOAK),
            "--seconds",
            str(seconds),
            "--grace",
            str(GRACE),
            "--json",
            str(out),
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=seconds + GRACE + 15,
    )
    output = proc.stdout + proc.stderr
    assert out.exists(), output
    return proc.returncode, json.loads(out.read_text()), output


def test_soak_block_delivers_everything_once_in_order(tmp_path: Path) -> None:
    rc, r, output = soak(
        tmp_path,
        *("--producers", "2", "--streams", "20", "--subscribers", "2", "--policy", "block"),
        seconds=3,
    )
    assert rc == 0, output
    assert r["ok"] and r["failures"] == [], output
    assert r["sent"] > 0 and r["delivered"] > 0, output
    assert r["delivered"] == 2 * r["sent"] == 2 * r["admitted"], output
    assert r["dropped"] == 0, output
    for name in ("loss", "extra", "duplicates", "out_of_order", "seq_errors"):
        assert r[name] == 0, (name, output)
    assert all(s["ended"] and s["unfinished_streams"] == 0 for s in r["subscribers"]), output
    assert r["broker"]["peak_rss_mb"] > 0, output


def test_soak_drop_loses_only_what_it_reports(tmp_path: Path) -> None:
    rc, r, output = soak(
        tmp_path,
        *("--producers", "2", "--streams", "10", "--subscribers", "2"),
        *("--policy", "drop", "--buffer-size", "10"),
        seconds=1.5,
    )
    assert rc == 0, output
    assert r["sent"] == r["admitted"] + r["dropped"], output
    assert r["delivered"] == 2 * r["admitted"] > 0, output
    for name in ("loss", "extra", "duplicates", "out_of_order", "seq_errors"):
        assert r[name] == 0, (name, output)


def test_soak_fails_when_the_broker_does_not_start(tmp_path: Path) -> None:
    rc, r, output = soak(tmp_path, "--broker-arg=--no-such-flag", seconds=1)
    assert rc == 1, output
    assert not r["ok"] and any("did not start" in f for f in r["failures"]), output
