"""The `edgemoe` console command: runs the verb in a child process and watches it.

llama.cpp and ggml run inside the Python process; when native code crashes (a segfault, an
abort) the interpreter dies with it. Run under this supervisor, such a crash ends with a
message that names the signal and its likely cause and exit code 3, never a bare
"Segmentation fault". Outputs are only ever renamed into place when complete, so a crash
leaves nothing at the output path (an export keeps its `.part` to resume from).

Exit codes: 0 success, 1 a check failed (validate), 2 bad input or an error,
3 a crash in native code, 130 interrupted. This module imports nothing heavy.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

CRASH_EXIT = 3
CRASH_SIGNALS = (signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: end the child too if the supervisor is killed (Linux)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def likely_cause(sig: int, env: dict[str, str] | None = None) -> str:
    """What most likely killed a child with `sig`, as advice for the user."""
    env = os.environ if env is None else env
    if sig in CRASH_SIGNALS and _has_amx() and env.get("EDGEMOE_EXTRA_BUFTS") == "1":
        return ("llama.cpp's AMX kernels (llama.cpp issue 20824): EDGEMOE_EXTRA_BUFTS=1 "
                "turned on the extra buffer types that edgemoe switches off on AMX CPUs")
    if sig == signal.SIGKILL:
        return "killed from outside, most often by the kernel's out-of-memory killer"
    return ("a crash in llama.cpp or ggml (native code); rerun with -v for llama.cpp's log "
            "and report it with the command")


def _has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_int8" in f.read()
    except OSError:
        return False


def run(argv: list[str], module: str = "edgemoe.cli") -> int:
    """Run `python -m MODULE ARGV` and return its exit code, or explain its crash."""
    child = subprocess.Popen([sys.executable, "-m", module, *argv],
                             preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    forwarded = {}

    def forward(sig, _frame):
        forwarded[sig] = True
        child.send_signal(sig)

    # Ctrl-C reaches the child from the terminal itself; a SIGTERM sent to us is passed on
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    old_term = signal.signal(signal.SIGTERM, forward)
    try:
        code = child.wait()
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
    if code >= 0:
        return code
    sig = -code
    if sig in (signal.SIGINT, signal.SIGTERM):
        print(f"edgemoe: stopped by {signal.Signals(sig).name}; nothing was written to the "
              "output path", file=sys.stderr)
        return 128 + sig
    verb = next((a for a in argv if not a.startswith("-")), "edgemoe")
    print(f"edgemoe: error: `edgemoe {verb}` crashed ({signal.Signals(sig).name}): likely "
          f"{likely_cause(sig)}. Nothing was written to the output path.", file=sys.stderr)
    return CRASH_EXIT


def main() -> None:
    if os.environ.get("EDGEMOE_NO_SUPERVISOR") == "1":
        from .cli import main as cli_main

        sys.exit(cli_main())
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
