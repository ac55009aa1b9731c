"""The `edgemoe` command. Each verb is a function whose keyword arguments are its flags."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from memory_planner import MemoryPlan, parse_size
from memory_planner.stats import CalibStats

from . import pipeline, report
from .hub import fetch_config, looks_like_repo_id

log = logging.getLogger("edgemoe")


def _load_stats(stats: str | None, imatrix: str | None, calib_text: str | None,
                source: str) -> tuple[CalibStats | None, str | None]:
    """Calibration statistics from a stats/imatrix file, or a calibration run on text."""
    from export.imatrix import read_stats

    given = [x for x in (stats, imatrix, calib_text) if x]
    if len(given) > 1:
        raise ValueError("give one of --stats, --imatrix, --calib-text")
    path = stats or imatrix
    if path:
        return read_stats(path), path
    if calib_text:
        from .calibrate import calibrate as run_calibration

        out = Path(f"{Path(source).name}.stats.gguf")
        stats = run_calibration(source, text=calib_text, output=str(out), sensitivity=True)
        return stats, str(out)
    return None, None


def _show_plan(plan: MemoryPlan, tradeoff: list) -> None:
    if tradeoff:
        print(report.tradeoff_table(tradeoff))
        print()
    print(report.plan_table(plan))
    print()
    print(report.budget_table(plan))


def _is_shape_only(source: str) -> bool:
    p = Path(source)
    return p.is_file() and p.suffix == ".json" or (
        p.is_dir() and (p / "config.json").is_file() and not any(p.glob("*.safetensors")))


def export(source: str, memory: str, output: str | None = None, ctx: int = pipeline.DEFAULT_CTX,
           kv_type: str = pipeline.DEFAULT_KV_TYPE, reserve: str = "0", type: str | None = None,
           stats: str | None = None, imatrix: str | None = None, calib_text: str | None = None,
           no_prune: bool = False, threads: int | None = None,
           plan_out: str | None = None, search: int = pipeline.DEFAULT_SEARCH) -> Path:
    """Export SOURCE as the best GGUF that fits in MEMORY."""
    if looks_like_repo_id(source):
        raise ValueError(f"{source} looks like a Hugging Face model id: export needs the "
                         f"weights on disk (hf download {source} --local-dir DIR), then "
                         "edgemoe export DIR; `edgemoe plan` works from the id alone")
    model = pipeline.open_model(source)
    budget = pipeline.make_budget(model.adapter, memory, ctx, kv_type, reserve)
    calib, _ = _load_stats(stats, imatrix, calib_text, source)
    plan, tradeoff = pipeline.make_plan(model, budget, type, stats=calib, prune=not no_prune)
    _show_plan(plan, tradeoff)
    out = Path(output) if output else Path(f"{Path(source).name}-{memory}.gguf")
    if plan_out:
        plan.save(plan_out)
    path = pipeline.export(model, plan, out, stats=calib, threads=threads, search=search)
    print(f"\nwrote {path} ({path.stat().st_size:,} bytes)\nrun it with llama.cpp: "
          f"{report.llama_server_command(path, plan)}")
    return path


def plan(source: str, memory: str, output: str | None = None, ctx: int = pipeline.DEFAULT_CTX,
         kv_type: str = pipeline.DEFAULT_KV_TYPE, reserve: str = "0",
         type: str | None = None, stats: str | None = None, imatrix: str | None = None,
         calib_text: str | None = None, no_prune: bool = False) -> MemoryPlan:
    """Plan an export of SOURCE for MEMORY without writing the model.

    SOURCE may also be a config.json (or a folder with one and no weights): the plan is then
    made from tensor shapes alone, with documented damage priors.
    """
    tradeoff: list = []
    if looks_like_repo_id(source):
        source = str(fetch_config(source))
    if _is_shape_only(source):
        from .shape_plan import plan_from_config

        p = plan_from_config(source, memory, ctx, kv_type, reserve, type)
        calib_path = None
    else:
        model = pipeline.open_model(source)
        budget = pipeline.make_budget(model.adapter, memory, ctx, kv_type, reserve)
        calib, calib_path = _load_stats(stats, imatrix, calib_text, source)
        p, tradeoff = pipeline.make_plan(model, budget, type, stats=calib, prune=not no_prune)
    _show_plan(p, tradeoff)
    print("\nthe same types with llama.cpp's own tool:")
    print(report.llama_quantize_command(p, imatrix=calib_path))
    if calib_path and not _is_shape_only(source) and calib.in_cov:
        print("\n(`edgemoe export` also picks each row's bytes among several ggml quantizations "
              "by output error, with the input covariances in the stats: the same types and "
              "sizes, less error; `--search 0` writes what this command writes)")
    if output:
        p.save(output)
        from .heatmap import plan_heatmap

        picture = plan_heatmap(p, Path(output).with_suffix(".png"), title=Path(source).name)
        print(f"\nwrote {output} and {picture}")
    return p


def calibrate(source: str, text: str | None = None, output: str | None = None,
              calib_model: str | None = None, ctx: int = 512,
              max_tokens: int | None = None, no_sensitivity: bool = False,
              cov_budget: str = "1GiB") -> None:
    """Run SOURCE in llama.cpp on text; write expert usage and importance matrices."""
    from . import calibrate as cal

    out = output or f"{Path(source).name}.stats.gguf"
    stats = cal.calibrate(source, text=text, output=out, calib_model=calib_model, n_ctx=ctx,
                          max_tokens=max_tokens, sensitivity=not no_sensitivity,
                          cov_budget=parse_size(cov_budget))
    print(cal.summary(stats))
    print(f"\nwrote {out} (a llama.cpp imatrix too: llama-quantize --imatrix {out})")


def inspect(file: str) -> None:
    """Show a GGUF file's tensor types and bits per weight by layer and tensor kind."""
    print(report.inspect_gguf(file))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgemoe",
        description="Fit a Mixture-of-Experts model into a memory cap as a GGUF for llama.cpp.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--traceback", action="store_true", help="show the traceback of an error")
    sub = p.add_subparsers(dest="verb", required=True)

    def budget_flags(sp):
        sp.add_argument("source", help="Hugging Face model directory or F32/F16/BF16/Q8_0 GGUF "
                        "(plan: also a config.json or a Hub model id)")
        sp.add_argument("--memory", required=True, help="memory cap: 128GB, 120GiB, 500MB")
        sp.add_argument("--ctx", type=int, default=pipeline.DEFAULT_CTX,
                        help="context length the KV cache must hold (default %(default)s)")
        sp.add_argument("--kv-type", default=pipeline.DEFAULT_KV_TYPE,
                        help="KV cache type: f16, q8_0, ... (default %(default)s)")
        sp.add_argument("--reserve", default="0", help="extra headroom to keep free, e.g. 2GB")
        sp.add_argument("--type", default=None,
                        help="force one GGUF type wherever it is legal (F32, Q8_0, ...)")
        sp.add_argument("--stats", default=None, help="calibration stats from edgemoe calibrate")
        sp.add_argument("--imatrix", default=None,
                        help="a llama.cpp importance matrix (.gguf or legacy .dat)")
        sp.add_argument("--calib-text", default=None, help="calibrate on this text file first")
        sp.add_argument("--no-prune", action="store_true", help="keep every expert")

    e = sub.add_parser("export", help="export a model as a GGUF that fits the memory cap")
    budget_flags(e)
    e.add_argument("-o", "--output", help="output .gguf (default SOURCE-MEMORY.gguf)")
    e.add_argument("--threads", type=int, default=None, help="quantization threads")
    e.add_argument("--plan-out", default=None, help="also write the plan JSON here")
    e.add_argument("--search", type=int, default=pipeline.DEFAULT_SEARCH,
                   help="ggml quantizations a row may get, keeping the one with the least "
                        "output error, where the stats hold input covariances (default "
                        f"{pipeline.DEFAULT_SEARCH}: the rows whose errors line up with the "
                        "inputs' correlations get a second one, corrected by GPTQ-style "
                        "error feedback; about twice the quantizing time; more: every row, "
                        "slower; 0 writes what llama-quantize writes)")
    pl = sub.add_parser("plan", help="plan an export without writing it")
    budget_flags(pl)
    pl.add_argument("-o", "--output", help="write the plan JSON (and a heatmap .png) here")
    c = sub.add_parser("calibrate", help=calibrate.__doc__, description=calibrate.__doc__)
    c.add_argument("source", help="Hugging Face model directory or GGUF")
    c.add_argument("--text", default=None, help="calibration text (default: shipped text)")
    c.add_argument("-o", "--output", default=None, help="stats file (default SOURCE.stats.gguf)")
    c.add_argument("--calib-model", default=None,
                   help="run this GGUF of the model instead of writing a temporary Q8_0")
    c.add_argument("--ctx", type=int, default=512, help="tokens per window (default 512)")
    c.add_argument("--max-tokens", type=int, default=None, help="use at most this many tokens")
    c.add_argument("--no-sensitivity", action="store_true",
                   help="skip the sensitivity probes (by default each tensor's KL divergence "
                        "per unit of predicted damage is measured with probe exports: one "
                        "llama.cpp run per tensor, or per tensor kind for large models; "
                        "without them the planner does not prune experts)")
    c.add_argument("--cov-budget", default="1GiB",
                   help="room for the inputs' covariances (256-column blocks) that export's "
                        "output-error search uses: one per expert if they fit, else one "
                        "shared by a layer's experts (gate/up only), else none (default 1GiB)")
    i = sub.add_parser("inspect", help=inspect.__doc__)
    i.add_argument("file")
    for name, verb in VERBS.items():
        sub.choices[name].set_defaults(func=verb)
    from .validate import add_cli  # validate, run, chat, calibrate-top-any

    add_cli(sub)
    return p


VERBS = {"export": export, "plan": plan, "calibrate": calibrate, "inspect": inspect}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same clean-up runs."""


def _raise_terminated(_sig, _frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    args = vars(_parser().parse_args(argv))
    logging.basicConfig(level=logging.DEBUG if args.pop("verbose") else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    show_traceback = args.pop("traceback")
    args.pop("verb")
    func = args.pop("func")
    on_main_thread = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, _raise_terminated) if on_main_thread else None
    try:
        result = func(**args)
    except BrokenPipeError:  # `edgemoe inspect f.gguf | head`: the reader went away
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except (ValueError, OSError, RuntimeError) as exc:  # library errors are typed ValueErrors
        if show_traceback:
            raise
        print(f"edgemoe: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print("edgemoe: interrupted; no partial output was kept", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, old_term)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
