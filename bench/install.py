"""What a newcomer's first commands cost: `make run`'s install (what serving needs) and `make test`'s (the
tools on top), each timed in a fresh clone of this repository, with the size of the virtual environment.

    python -m bench.install        # prints the figures; make bench records them in its results file

The installs take their wheels where pip on this machine finds them (its configured indexes and cache), as a
newcomer's would; the time to download torch the first time is not in them.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path

from bench.harness import REPO


def du_mib(folder: Path) -> int:
    return int(subprocess.run(["du", "-sm", str(folder)], check=True, capture_output=True, text=True).stdout.split()[0])


def timed_make(clone: Path, target: str) -> float:
    started = time.perf_counter()
    subprocess.run(["make", "--no-print-directory", target], cwd=clone, check=True, capture_output=True)
    return round(time.perf_counter() - started, 1)


def measure() -> dict:
    """Seconds and MiB for the serving install, the development install on top of it, and the serving install
    again (a second `make run` only checks its stamp)."""
    with tempfile.TemporaryDirectory(prefix="setup-") as work:
        clone = Path(work) / "clone"
        subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(REPO), str(clone)], check=True)
        runtime_s = timed_make(clone, ".venv/.runtime-installed")
        runtime_mib = du_mib(clone / ".venv")
        again_s = timed_make(clone, ".venv/.runtime-installed")
        dev_s = timed_make(clone, ".venv/.dev-installed")
        return {"runtime_install_s": runtime_s, "runtime_venv_mib": runtime_mib, "runtime_again_s": again_s,
                "dev_install_s": dev_s, "dev_venv_mib": du_mib(clone / ".venv")}


if __name__ == "__main__":
    print(json.dumps(measure(), indent=1))
