"""Run one command in a child process and measure what it costs.

- wall time, and CPU time (user + system) of the whole tree; the CPU time of its busiest
  thread (sampled with the tree), which bounds the serial part of the work (a shared,
  overloaded machine stretches wall time, not CPU time);
- peak anonymous RSS of its process tree (RssAnon of every process in it, summed, sampled
  every 15 ms; the tree is rescanned for new processes every 150 ms), and the peak
  file-backed RSS (memory-mapped files) beside it;
- peak extra disk: the bytes allocated (st_blocks) under the watched folders above what was
  there when the command started, sampled every 100 ms;
- bytes read: read_bytes (from the block device) and rchar (read() calls, page cache hits
  included; memory-mapped reads are not calls) of the whole tree, from /proc/PID/io of a
  small wrapper process after it has reaped the command (Linux adds a reaped child's counts,
  and those of the children it reaped, to its parent's).

Inputs can be evicted from the page cache first (`evict`: posix_fadvise DONTNEED on those
files only), so that read_bytes counts real reads and every run starts cold.

    python benchmarks/measure.py --wrap IO.json -- CMD ARGS...   (the wrapper; internal)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

RSS_EVERY = 0.015
TREE_EVERY = 0.15
DISK_EVERY = 0.1


@dataclass
class Measured:
    seconds: float
    cpu_seconds: float  # user + system, whole tree
    peak_anon: int  # bytes, summed over the process tree
    peak_file: int
    peak_disk: int  # bytes allocated under the watched folders beyond the start
    read_bytes: int
    rchar: int
    returncode: int
    busiest_thread_seconds: float = 0.0  # CPU time of the busiest thread seen (sampled)
    threads_seconds: float = 0.0  # CPU time of all threads seen (sampled; <= cpu_seconds)
    killed_over: int | None = None  # the anon RSS limit the run was stopped at, if it was

    def to_dict(self) -> dict:
        return asdict(self)


def _io() -> dict[str, int]:
    with open("/proc/self/io") as fh:
        return {k: int(v) for k, v in (line.split(": ") for line in fh if ": " in line)}


def _wrap(io_out: str, cmd: list[str]) -> int:
    import resource

    before = _io()
    rc = subprocess.call(cmd)
    after = _io()
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)  # the reaped tree's CPU time
    got = {k: after[k] - before[k] for k in after}
    got["cpu_seconds"] = ru.ru_utime + ru.ru_stime
    Path(io_out).write_text(json.dumps(got))
    return rc


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(name))
    return kids


def _descendants(root: int) -> set[int]:
    kids, out, todo = _children_map(), set(), [root]
    while todo:
        for c in kids.get(todo.pop(), ()):
            out.add(c)
            todo.append(c)
    return out


def _rss(pid: int) -> tuple[int, int]:
    try:
        with open(f"/proc/{pid}/status") as fh:
            got = {k: int(v.split()[0]) * 1024 for k, _, v in (line.partition(":") for line in fh)
                   if k in ("RssAnon", "RssFile")}
        return got.get("RssAnon", 0), got.get("RssFile", 0)
    except OSError:
        return 0, 0


def _thread_times(pid: int, into: dict[tuple[int, int], float]) -> None:
    """CPU seconds (user + system) of each thread of `pid`, the largest seen kept."""
    tick = os.sysconf("SC_CLK_TCK")
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as fh:
                f = fh.read().rsplit(")", 1)[1].split()
            into[(pid, int(tid))] = max(into.get((pid, int(tid)), 0.0),
                                        (int(f[11]) + int(f[12])) / tick)
        except (OSError, IndexError, ValueError):
            pass


def disk_bytes(folders: list[Path]) -> int:
    total = 0
    for folder in folders:
        for dirpath, _, files in os.walk(folder):
            for f in files:
                try:
                    total += os.stat(os.path.join(dirpath, f)).st_blocks * 512
                except OSError:  # removed while we looked
                    pass
    return total


def evict(paths: list[Path]) -> None:
    """Drop these files (folders: the files in them) from the page cache."""
    for p in paths:
        for f in ([p] if p.is_file() else [x for x in p.rglob("*") if x.is_file()]):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


class _Sampler(threading.Thread):
    def __init__(self, root: int, watch: list[Path], max_anon: int | None):
        super().__init__(daemon=True)
        self.root, self.watch, self.max_anon = root, watch, max_anon
        self.base_disk = disk_bytes(watch)
        self.peak_anon = self.peak_file = self.peak_disk = 0
        self.killed_over: int | None = None
        self.threads: dict[tuple[int, int], float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        tree: set[int] = set()
        next_tree = next_disk = 0.0
        while not self.stop.is_set():
            now = time.monotonic()
            if now >= next_tree:
                tree, next_tree = _descendants(self.root), now + TREE_EVERY
                for pid in tree:
                    _thread_times(pid, self.threads)
            anon = file = 0
            for pid in tree:  # the wrapper itself is not counted
                a, f = _rss(pid)
                anon, file = anon + a, file + f
            self.peak_anon, self.peak_file = max(self.peak_anon, anon), max(self.peak_file, file)
            if self.max_anon and anon > self.max_anon and self.killed_over is None:
                self.killed_over = self.max_anon
                for pid in tree:
                    try:
                        os.kill(pid, 9)
                    except OSError:
                        pass
            if now >= next_disk:
                extra = disk_bytes(self.watch) - self.base_disk
                self.peak_disk, next_disk = max(self.peak_disk, extra), now + DISK_EVERY
            self.stop.wait(RSS_EVERY)


def run_measured(cmd: list[str], cwd: Path, log: Path, watch: list[Path],
                 env: dict[str, str] | None = None, inputs: list[Path] = (),
                 max_anon: int | None = None) -> Measured:
    """Run `cmd` in `cwd` (output to `log`), measured; `inputs` are evicted from the page
    cache first; the tree is killed if its anonymous RSS passes `max_anon`."""
    evict(list(inputs))
    io_file = log.resolve().with_suffix(".io.json")
    io_file.unlink(missing_ok=True)
    wrapper = [sys.executable, "-S", str(Path(__file__).resolve()), "--wrap", str(io_file),
               "--", *cmd]
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(wrapper, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        sampler = _Sampler(proc.pid, watch, max_anon)
        sampler.start()
        rc = proc.wait()
        seconds = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    sampler.peak_disk = max(sampler.peak_disk, disk_bytes(watch) - sampler.base_disk)
    io = json.loads(io_file.read_text()) if io_file.is_file() else {}
    busiest = max(sampler.threads.values(), default=0.0)
    return Measured(seconds, io.get("cpu_seconds", 0.0), sampler.peak_anon, sampler.peak_file,
                    sampler.peak_disk, io.get("read_bytes", 0), io.get("rchar", 0), rc,
                    busiest, sum(sampler.threads.values()), sampler.killed_over)


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[1] == "--wrap" and sys.argv[3] == "--":
        sys.exit(_wrap(sys.argv[2], sys.argv[4:]))
    sys.exit(__doc__)
