"""Profiles of the processes under load: py-spy (on-CPU samples) when installed, else pyinstrument.

py-spy attaches to the process once it is ready and detaches before it is stopped, so start-up
and shutdown stay out of the profile; its raw samples are summarised into a text file (the
functions that hold the CPU, inclusive and self). pyinstrument (in the venv) wraps the command
and profiles the whole life of the process, wall-clock.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Protocol

PY = sys.executable


class Profiler(Protocol):
    """Wraps a child's command, or attaches to it once started."""

    def wrap(self, argv: list[str]) -> list[str]:
        """The command to run instead of `argv`."""

    async def started(self, pid: int) -> None:
        """The child is ready."""

    async def stopping(self) -> None:
        """The child is about to be stopped."""


def py_spy() -> str | None:
    """The py-spy binary beside this Python, else on PATH (None when BENCH_PROFILER=pyinstrument)."""
    if os.environ.get("BENCH_PROFILER") == "pyinstrument":
        return None
    beside = Path(PY).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def attach(child: _HasProfiler, output: Path) -> _HasProfiler:
    """Profile `child` into `output` (its suffix is replaced) with the best profiler available."""
    output.parent.mkdir(parents=True, exist_ok=True)
    spy = py_spy()
    child.profiler = PySpy(spy, output.with_suffix(".raw")) if spy else Pyinstrument(output)
    return child


class _HasProfiler(Protocol):
    profiler: Profiler | None


class Pyinstrument:
    """pyinstrument around the whole process; the session is rendered by `render`."""

    def __init__(self, output: Path) -> None:
        self.session = output.with_suffix(".pyisession")

    def wrap(self, argv: list[str]) -> list[str]:
        """`python -m pyinstrument ... <the same target>`."""
        script = f"import runpy; runpy.run_path({argv[0]!r}, run_name='__main__')"
        target = argv[1:] if argv[0] == PY else ["-c", script]
        return [PY, "-m", "pyinstrument", "--renderer", "session", "--outfile", str(self.session), *target]

    async def started(self, pid: int) -> None:
        """Nothing: it runs from the start."""

    async def stopping(self) -> None:
        """Nothing: it writes its session when the process exits."""


class PySpy:
    """`py-spy record` attached between `started` and `stopping`."""

    def __init__(self, binary: str, raw: Path) -> None:
        self.binary = binary
        self.raw = raw
        self.proc: asyncio.subprocess.Process | None = None

    def wrap(self, argv: list[str]) -> list[str]:
        """The command unchanged."""
        return argv

    async def started(self, pid: int) -> None:
        """Start sampling the process (on-CPU samples only, 250 Hz)."""
        self.proc = await asyncio.create_subprocess_exec(
            self.binary,
            "record",
            "--pid",
            str(pid),
            "--rate",
            "250",
            "--format",
            "raw",
            "--output",
            str(self.raw),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    async def stopping(self) -> None:
        """Stop sampling; py-spy writes its samples on SIGINT."""
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


def summarize(raw: Path, top: int = 40) -> str:
    """The functions holding the CPU in py-spy raw samples: inclusive and self shares."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_frame(f) for f in stack.split(";") if f]
        for name in set(frames):
            inclusive[name] += n
        if frames:
            own[frames[-1]] += n
    lines = [f"# {raw.stem}: {total} on-CPU samples (py-spy, 250 Hz)", "", "## inclusive"]
    lines += [f"{100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(top) if n < total]
    lines += ["", "## self"]
    lines += [f"{100 * n / total:5.1f}%  {name}" for name, n in own.most_common(top)]
    return "\n".join(lines) + "\n"


def _frame(frame: str) -> str:
    """`function (file.py)` from py-spy's `function (path/file.py:line)`."""
    name, _, where = frame.partition(" (")
    path = where.rsplit(":", 1)[0]
    if "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    elif "/work/" in path or "/lib/python" in path:
        path = path.rsplit("/", 2)[-2] + "/" + path.rsplit("/", 1)[-1] if "/" in path else path
    return f"{name} ({path})"


def render(directory: Path) -> list[Path]:
    """Render every profile in `directory` as text beside it; the rendered files."""
    rendered = []
    for raw in sorted(directory.glob("*.raw")):
        text = raw.with_suffix(".txt")
        text.write_text(summarize(raw))
        rendered.append(text)
    for session in sorted(directory.glob("*.pyisession")):
        text = session.with_suffix(".txt")
        subprocess.run(
            [PY, "-m", "pyinstrument", "--load", str(session), "-r", "text", "-o", str(text)], check=False
        )
        rendered.append(text)
    return rendered
