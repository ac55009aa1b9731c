"""The `edgemoe` command. Each verb is a function whose keyword arguments are its flags."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from memory_planner import MemoryPlan

from . import pipeline, report

log = logging.getLogger("edgemoe")


def export(source: str, memory: str, output: str | None = None, ctx: int = pipeline.DEFAULT_CTX,
           kv_type: str = pipeline.DEFAULT_KV_TYPE, reserve: str = "0", type: str | None = None,
           threads: int | None = None, plan_out: str | None = None) -> Path:
    """Export SOURCE as the best GGUF that fits in MEMORY."""
    model = pipeline.open_model(source)
    budget = pipeline.make_budget(model.adapter, memory, ctx, kv_type, reserve)
    plan = pipeline.make_plan(model, budget, type)
    print(report.plan_table(plan))
    print()
    print(report.budget_table(plan))
    out = Path(output) if output else Path(f"{Path(source).name}-{memory}.gguf")
    if plan_out:
        plan.save(plan_out)
    path = pipeline.export(model, plan, out, threads=threads)
    print(f"\nwrote {path} ({path.stat().st_size:,} bytes)")
    return path


def plan(source: str, memory: str, output: str | None = None, ctx: int = pipeline.DEFAULT_CTX,
         kv_type: str = pipeline.DEFAULT_KV_TYPE, reserve: str = "0",
         type: str | None = None) -> MemoryPlan:
    """Plan an export of SOURCE for MEMORY without writing the model."""
    model = pipeline.open_model(source)
    budget = pipeline.make_budget(model.adapter, memory, ctx, kv_type, reserve)
    p = pipeline.make_plan(model, budget, type)
    print(report.plan_table(p))
    print()
    print(report.budget_table(p))
    if output:
        p.save(output)
        print(f"\nwrote {output}")
    return p


def inspect(file: str) -> None:
    """Show a GGUF file's tensor types and bits per weight by layer and tensor kind."""
    print(report.inspect_gguf(file))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgemoe", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--traceback", action="store_true", help="show the traceback of an error")
    sub = p.add_subparsers(dest="verb", required=True)

    def budget_flags(sp):
        sp.add_argument("source", help="Hugging Face model directory")
        sp.add_argument("--memory", required=True, help="memory cap: 128GB, 120GiB, 500MB")
        sp.add_argument("--ctx", type=int, default=pipeline.DEFAULT_CTX,
                        help="context length the KV cache must hold (default %(default)s)")
        sp.add_argument("--kv-type", default=pipeline.DEFAULT_KV_TYPE,
                        help="KV cache type: f16, q8_0, ... (default %(default)s)")
        sp.add_argument("--reserve", default="0", help="extra headroom to keep free, e.g. 2GB")
        sp.add_argument("--type", default=None,
                        help="force one GGUF type wherever it is legal (F32, Q8_0, ...)")

    e = sub.add_parser("export", help=export.__doc__, description=export.__doc__)
    budget_flags(e)
    e.add_argument("-o", "--output", help="output .gguf (default SOURCE-MEMORY.gguf)")
    e.add_argument("--threads", type=int, default=None, help="quantization threads")
    e.add_argument("--plan-out", default=None, help="also write the plan JSON here")
    pl = sub.add_parser("plan", help=plan.__doc__, description=plan.__doc__)
    budget_flags(pl)
    pl.add_argument("-o", "--output", help="write the plan JSON here")
    i = sub.add_parser("inspect", help=inspect.__doc__, description=inspect.__doc__)
    i.add_argument("file")
    return p


VERBS = {"export": export, "plan": plan, "inspect": inspect}


def main(argv: list[str] | None = None) -> int:
    args = vars(_parser().parse_args(argv))
    logging.basicConfig(level=logging.DEBUG if args.pop("verbose") else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    show_traceback = args.pop("traceback")
    verb = VERBS[args.pop("verb")]
    try:
        verb(**args)
    except (ValueError, OSError, RuntimeError) as exc:  # library errors are typed ValueErrors
        if show_traceback:
            raise
        print(f"edgemoe: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgemoe: interrupted; no partial output was kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
