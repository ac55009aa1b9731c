"""The `edgemoe` command. Each verb is a function whose keyword arguments are its flags.

Planning and export: export, plan, calibrate, inspect, card (here). The file in llama.cpp:
validate, run, chat, serve, calibrate-top-any (`edgemoe.runtime.verbs`). `main` turns
library errors into messages and exit codes; `edgemoe.supervise`, the console entry point,
runs `python -m edgemoe.cli` in a child.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from export.arch import adapter_for
from export.gguf_io import check_output
from export.split import SplitSpec, parse_shard
from memory_planner import MemoryPlan, parse_size
from memory_planner import solve as mp_solve

from . import pipeline
from .planning.from_config import is_config_only
from .planning.hub import fetch_config, looks_like_repo_id
from .report import tables as report
from .runtime import serve as serving
from .runtime.validate import DEFAULT_EVAL_CTX, DEFAULT_MAX_TOKENS
from .runtime.verbs import calibrate_top_any, chat, run, serve, validate


def _gpu_setup(gpu_memory, min_tps, cpu_bandwidth, gpu_bandwidth):
    """The GPUs of --gpu-memory (None: a system-RAM-only plan)."""
    if not gpu_memory:
        if min_tps:
            raise ValueError("--min-tps weighs devices' speeds: give --gpu-memory too")
        return None
    from .planning.gpu import GPUSetup

    return GPUSetup.parse(gpu_memory, cpu_bandwidth, gpu_bandwidth, min_tps)


def _budget(model, memory, ctx, kv_type, reserve, setup):
    """The budget and one-keep-count solver: system RAM only, or GPUs + system RAM."""
    if setup is None:
        return pipeline.make_budget(model.adapter, memory, ctx, kv_type, reserve), mp_solve
    return setup.placed(model.adapter, memory, ctx, kv_type, reserve)


def _show_plan(plan: MemoryPlan, tradeoff: list, adapter=None) -> None:
    if tradeoff:
        print(report.tradeoff_table(tradeoff))
        print()
    print(report.plan_table(plan))
    print()
    print(report.budget_table(plan))
    if plan.devices:
        print()
        print(report.device_table(plan, adapter.tensor_specs(plan.n_experts_kept or None),
                                  adapter.n_expert_used))


def export(source: str, memory: str, output: str | None = None, ctx: int = pipeline.DEFAULT_CTX,
           kv_type: str = pipeline.DEFAULT_KV_TYPE, reserve: str = "0", type: str | None = None,
           stats: str | None = None, imatrix: str | None = None, calib_text: str | None = None,
           no_prune: bool = False, threads: int | None = None,
           plan_out: str | None = None, search: int = pipeline.DEFAULT_SEARCH,
           plan_file: str | None = None, split_max_size: str | None = None,
           shard: str | None = None, gpu_memory: list[str] | None = None,
           min_tps: float | None = None, cpu_bandwidth: str | None = None,
           gpu_bandwidth: str | None = None) -> Path:
    """Export SOURCE as the best GGUF that fits in MEMORY."""
    if looks_like_repo_id(source):
        raise ValueError(f"{source} looks like a Hugging Face model id: export needs the "
                         f"weights on disk (hf download {source} --local-dir DIR), then "
                         "edgemoe export DIR; `edgemoe plan` works from the id alone")
    split = None
    if split_max_size or shard:
        if not split_max_size:
            raise ValueError("--shard writes one file of a split export: give --split-max-size")
        i, n = parse_shard(shard) if shard else (None, None)
        split = SplitSpec(parse_size(split_max_size), i, n)
    model = pipeline.open_model(source)
    out = check_output(output or f"{Path(source).name}-{memory}.gguf", model.source.files)
    calib, _ = pipeline.load_stats(model, stats, imatrix, calib_text)
    if plan_file:  # a plan JSON from `edgemoe plan -o`, for this model
        plan, tradeoff = MemoryPlan.load(plan_file), []
        plan.check_model(model.adapter.tensor_specs(plan.n_experts_kept or None), plan_file)
    else:
        setup = _gpu_setup(gpu_memory, min_tps, cpu_bandwidth, gpu_bandwidth)
        budget, solver = _budget(model, memory, ctx, kv_type, reserve, setup)
        plan, tradeoff = pipeline.make_plan(model, budget, type, stats=calib,
                                            prune=not no_prune, solver=solver)
    _show_plan(plan, tradeoff, model.adapter)
    if plan_out:
        plan.save(plan_out)
    path = pipeline.export(model, plan, out, stats=calib, threads=threads, search=search,
                           split=split)
    print(f"\nwrote {path} ({path.stat().st_size:,} bytes)")
    if split is not None and split.shard is None:
        files = sorted(path.parent.glob(path.name.replace("-00001-of-", "-*-of-")))
        print(f"and {len(files) - 1} more files beside it "
              f"({sum(f.stat().st_size for f in files):,} bytes in all)")
    if split is None or split.shard in (None, 1):  # llama.cpp is given the first file
        print(f"run it with llama.cpp: {report.llama_server_command(path, plan)}")
        print(f"model card and ollama Modelfile: edgemoe card {path}")
    return path


def plan(source: str, memory: str, output: str | None = None, ctx: int = pipeline.DEFAULT_CTX,
         kv_type: str = pipeline.DEFAULT_KV_TYPE, reserve: str = "0",
         type: str | None = None, stats: str | None = None, imatrix: str | None = None,
         calib_text: str | None = None, no_prune: bool = False,
         gpu_memory: list[str] | None = None, min_tps: float | None = None,
         cpu_bandwidth: str | None = None, gpu_bandwidth: str | None = None) -> MemoryPlan:
    """Plan an export of SOURCE for MEMORY without writing the model.

    SOURCE may also be a config.json (or a folder with one and no weights): the plan is then
    made from tensor shapes alone, with documented damage priors.
    """
    tradeoff: list = []
    if looks_like_repo_id(source):
        source = str(fetch_config(source))
    calib_path = None
    setup = _gpu_setup(gpu_memory, min_tps, cpu_bandwidth, gpu_bandwidth)
    if is_config_only(source):
        from .planning.from_config import plan_from_config, read_config

        adapter = adapter_for(read_config(source))
        budget, solver = None, mp_solve
        if setup:
            budget, solver = setup.placed(adapter, memory, ctx, kv_type, reserve)
        p = plan_from_config(source, memory, ctx, kv_type, reserve, type, budget=budget,
                             solver=solver)
    else:
        model = pipeline.open_model(source)
        adapter = model.adapter
        budget, solver = _budget(model, memory, ctx, kv_type, reserve, setup)
        calib, calib_path = pipeline.load_stats(model, stats, imatrix, calib_text)
        p, tradeoff = pipeline.make_plan(model, budget, type, stats=calib, prune=not no_prune,
                                         solver=solver)
    _show_plan(p, tradeoff, adapter)
    if p.devices:
        print(f"\nrun the exported file with: {report.llama_server_command('MODEL.gguf', p)}")
    print("\nthe same types with llama.cpp's own tool:")
    print(report.llama_quantize_command(p, imatrix=calib_path))
    if calib_path and not is_config_only(source) and calib.in_cov:
        print("\n(`edgemoe export` also picks each row's bytes among several quantizations "
              "by output error, with the input covariances in the stats: the same types and "
              "sizes, less error; `--search 0` writes what this command writes)")
    if output:
        p.save(output)
        from .report.heatmap import plan_heatmap

        picture = plan_heatmap(p, Path(output).with_suffix(".png"), title=Path(source).name)
        print(f"\nwrote {output} and {picture}")
    return p


def calibrate(source: str, text: str | None = None, output: str | None = None,
              calib_model: str | None = None, ctx: int = 512,
              max_tokens: int | None = None, no_sensitivity: bool = False,
              cov_budget: str = "1GiB", max_disk: str | None = None,
              threads: int | None = None, probe_seconds: float | None = None,
              calib_type: str | None = None) -> None:
    """Run SOURCE in llama.cpp on text; write expert usage and importance matrices."""
    from .calibration import collect as cal

    out = output or f"{Path(source).name}.stats.gguf"
    stats = cal.calibrate(source, text=text, output=out, calib_model=calib_model, n_ctx=ctx,
                          max_tokens=max_tokens, sensitivity=not no_sensitivity,
                          cov_budget=parse_size(cov_budget), threads=threads,
                          max_disk=parse_size(max_disk) if max_disk else None,
                          probe_seconds=probe_seconds, calib_type=calib_type)
    print(cal.summary(stats))
    print(f"\nwrote {out} (a llama.cpp imatrix too: llama-quantize --imatrix {out})")


def inspect(file: str) -> None:
    """Show a GGUF file's tensor types and bits per weight by layer and tensor kind."""
    print(report.inspect_gguf(file))


def card(file: str, validation: str | None = None, output_dir: str | None = None) -> None:
    """Write a model card (README.md), the plan's heatmap and an ollama Modelfile beside
    FILE (an edgemoe export; the first file of a split one)."""
    from .report.card import write_card

    for p in write_card(file, validation, output_dir):
        print(f"wrote {p}")


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
        sp.add_argument("--gpu-memory", dest="gpu_memory", action="append", default=None,
                        metavar="SIZE", help="a GPU's memory beside --memory (system RAM): "
                        "plan types and placement together, print the llama-server offload "
                        "flags; several GPUs: 24GB,24GB or the flag repeated (experts are "
                        "not pruned in these plans)")
        sp.add_argument("--min-tps", dest="min_tps", type=float, default=None,
                        help="with --gpu-memory: the best plan decoding at least this many "
                             "tokens/s, estimated from bytes read per token and bandwidths")
        sp.add_argument("--cpu-bandwidth", dest="cpu_bandwidth", default=None,
                        metavar="SIZE", help="system RAM read bandwidth per second "
                        "(default 60GB)")
        sp.add_argument("--gpu-bandwidth", dest="gpu_bandwidth", default=None,
                        metavar="SIZE", help="GPU memory bandwidth per second (default 900GB)")

    e = sub.add_parser("export", help="export a model as a GGUF that fits the memory cap")
    budget_flags(e)
    e.add_argument("-o", "--output", help="output .gguf (default SOURCE-MEMORY.gguf)")
    e.add_argument("--threads", type=int, default=None, help="quantization threads")
    e.add_argument("--plan-out", default=None, help="also write the plan JSON here")
    e.add_argument("--plan", dest="plan_file", default=None, metavar="PLAN.json",
                   help="write this plan (from `edgemoe plan -o`) instead of planning again")
    e.add_argument("--search", type=int, default=pipeline.DEFAULT_SEARCH,
                   help="candidate quantizations a row may get, keeping the one with the least "
                        "output error, where the stats hold input covariances (default "
                        f"{pipeline.DEFAULT_SEARCH}: the rows whose errors line up with the "
                        "inputs' correlations get a second one, corrected by GPTQ-style "
                        "error feedback; about twice the quantizing time; more: every row, "
                        "slower; 0 writes what llama-quantize writes)")
    e.add_argument("--split-max-size", dest="split_max_size", default=None, metavar="SIZE",
                   help="write llama.cpp's split layout (OUT-00001-of-0000N.gguf ...), each "
                        "file at most SIZE (e.g. 50GB, the Hub's limit); llama.cpp loads the "
                        "first file")
    e.add_argument("--shard", default=None, metavar="i/N",
                   help="with --split-max-size, write only file i of N (one process per "
                        "file, e.g. a job array; give every process the same --plan)")
    pl = sub.add_parser("plan", help="plan an export without writing it")
    budget_flags(pl)
    pl.add_argument("-o", "--output", help="write the plan JSON (and a heatmap .png) here")
    c = sub.add_parser("calibrate", help=calibrate.__doc__, description=calibrate.__doc__)
    c.add_argument("source", help="Hugging Face model directory or GGUF")
    c.add_argument("--text", default=None, help="calibration text (default: shipped text)")
    c.add_argument("-o", "--output", default=None, help="stats file (default SOURCE.stats.gguf)")
    c.add_argument("--calib-model", default=None,
                   help="run this GGUF of the model (an HF source is otherwise run as an "
                        "intermediate GGUF written beside the output; a GGUF source as it is)")
    c.add_argument("--calib-type", default=None,
                   help="an HF source's intermediate at this one type (Q8_0, Q4_K, ...), "
                        "whole or in layer segments, instead of the most faithful that fits")
    c.add_argument("--ctx", type=int, default=512, help="tokens per window (default 512)")
    c.add_argument("--max-tokens", type=int, default=None, help="use at most this many tokens")
    c.add_argument("--no-sensitivity", action="store_true",
                   help="skip the sensitivity probes (by default each tensor's KL divergence "
                        "per unit of predicted damage is measured in llama.cpp on the model "
                        "calibration runs, one pass per probe, no file written; without them "
                        "the planner does not prune experts)")
    c.add_argument("--probe-seconds", type=float, default=None,
                   help="time for the sensitivity probes: every tensor alone if that fits, "
                        "else each tensor kind on a few layers, then single layers spread "
                        "over depth; the rest carry their kind's scale (default: 0.4 of the "
                        "calibration run's time, or what the run left of 40 s; the reference "
                        "is the run's own logits)")
    c.add_argument("--cov-budget", default="1GiB",
                   help="room for the inputs' covariances (256-column blocks) that export's "
                        "output-error search uses: one per expert if they fit, else one "
                        "shared by a layer's experts (gate/up, shared expert), as many as fit, "
                        "those serving the most weights per byte first (default 1GiB)")
    c.add_argument("--max-disk", default=None,
                   help="disk the checkpoint of the sums (float32, no larger than the stats "
                        "file) and an HF source's intermediate GGUF may take (a GGUF source "
                        "below the checkpoint's size runs without one): "
                        "the most faithful type that fits is run (Q8_0, then experts "
                        "lower, ...), as a whole file or else a segment of layers at a time "
                        "(no whole-model copy, the same statistics and probes; default 90%% "
                        "of the free space beside the output)")
    c.add_argument("--threads", type=int, default=None,
                   help="llama.cpp threads and workers adding up the statistics (default: "
                        "every core)")
    i = sub.add_parser("inspect", help=inspect.__doc__)
    i.add_argument("file")
    cd = sub.add_parser("card", help=card.__doc__, description=card.__doc__)
    cd.add_argument("file")
    cd.add_argument("--validation", metavar="REPORT.json",
                    help="an `edgemoe validate --json` report of FILE, shown in the card")
    cd.add_argument("--output-dir", dest="output_dir", default=None,
                    help="folder to write into (default: FILE's)")

    def top_any_flag(p):
        p.add_argument("--top-any", dest="top_any", default=None, metavar="SPEC",
                       help="top-any thresholds: 'file' (stored, default), 'off', one tau "
                            "(0.3), one per block (0,0.2,...) or a calibration JSON")

    def threads_flag(p):
        p.add_argument("--threads", type=int, default=None, help="CPU threads")

    v = sub.add_parser("validate", help=validate.__doc__, description=validate.__doc__)
    v.add_argument("file", help="GGUF file")
    v.add_argument("--reference", help="F32/BF16 GGUF or HF directory for KL divergence")
    v.add_argument("--text", help="held-out text file for perplexity and KLD")
    top_any_flag(v)
    v.add_argument("--json", dest="json_path", metavar="REPORT", help="write the report here")
    v.add_argument("--max-kld", dest="max_kld", type=float, default=None,
                   help="fail (exit 1) when the mean KL divergence is above this")
    v.add_argument("--memory", default=None, help="cap to check against (default: the plan's)")
    v.add_argument("--ctx", type=int, default=None, help="context length (default: the plan's)")
    v.add_argument("--kv-type", dest="kv_type", default=None,
                   help="KV cache type (default: the plan's)")
    v.add_argument("--eval-ctx", dest="eval_ctx", type=int, default=DEFAULT_EVAL_CTX,
                   help="window for perplexity (default %(default)s)")
    v.add_argument("--max-tokens", dest="max_tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help="text tokens used at most (default %(default)s)")
    threads_flag(v)

    def run_settings_flags(sp):
        sp.add_argument("--ctx", type=int, default=None,
                        help="context length (default: the one the file's plan was made for, "
                             "else 4096)")
        sp.add_argument("--kv-type", dest="kv_type", default=None,
                        help="KV cache type (default: the plan's, else f16)")

    r = sub.add_parser("run", help=run.__doc__, description=run.__doc__)
    r.add_argument("file")
    r.add_argument("-p", "--prompt", required=True)
    top_any_flag(r)
    r.add_argument("-n", "--max-tokens", dest="max_tokens", type=int, default=256)
    r.add_argument("--temperature", type=float, default=0.8)
    run_settings_flags(r)
    r.add_argument("--seed", type=int, default=None)
    threads_flag(r)

    ch = sub.add_parser("chat", help=chat.__doc__, description=chat.__doc__)
    ch.add_argument("file")
    top_any_flag(ch)
    ch.add_argument("--system", default=None, help="system prompt")
    ch.add_argument("-n", "--max-tokens", dest="max_tokens", type=int, default=512)
    ch.add_argument("--temperature", type=float, default=0.7)
    run_settings_flags(ch)
    threads_flag(ch)

    sv = sub.add_parser("serve", help=serve.__doc__, description=serve.__doc__)
    sv.add_argument("file")
    sv.add_argument("--host", default=serving.DEFAULT_HOST,
                    help="address to listen on (default %(default)s: this machine only)")
    sv.add_argument("--port", type=int, default=serving.DEFAULT_PORT, help="default %(default)s")
    top_any_flag(sv)
    run_settings_flags(sv)
    sv.add_argument("--alias", default=None, help="model id in /v1/models (default: file name)")
    sv.add_argument("--api-key", dest="api_key", default=None,
                    help="require this bearer key on every request")
    threads_flag(sv)

    k = sub.add_parser("calibrate-top-any", help=calibrate_top_any.__doc__,
                       description=calibrate_top_any.__doc__)
    k.add_argument("file")
    k.add_argument("--text", required=True, help="calibration text file")
    goal = k.add_mutually_exclusive_group(required=True)
    goal.add_argument("--share", type=float, help="share of expert activations to remove")
    goal.add_argument("--max-ppl-increase", dest="max_ppl_increase", type=float,
                      help="relative perplexity budget, e.g. 0.01 for 1%%")
    goal.add_argument("--max-kld", dest="max_kld", type=float, help="mean KLD budget")
    k.add_argument("--method", choices=["layer", "uniform"], default="layer",
                   help="per-layer sensitivity or one tau for all layers")
    k.add_argument("-o", "--output", help="write the GGUF with thresholds here (default: FILE)")
    k.add_argument("--json", dest="json_path", help="write the calibration report here")
    k.add_argument("--eval-ctx", dest="eval_ctx", type=int, default=DEFAULT_EVAL_CTX)
    k.add_argument("--max-tokens", dest="max_tokens", type=int, default=DEFAULT_MAX_TOKENS)
    threads_flag(k)
    for name, verb in VERBS.items():
        sub.choices[name].set_defaults(func=verb)
    return p


VERBS = {"export": export, "plan": plan, "calibrate": calibrate, "inspect": inspect, "card": card,
         "validate": validate, "run": run, "chat": chat, "serve": serve,
         "calibrate-top-any": calibrate_top_any}


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
        is_os = isinstance(exc, OSError) and exc.filename and exc.strerror
        print(f"edgemoe: error: {f'{exc.filename}: {exc.strerror}' if is_os else exc}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"edgemoe: interrupted; {exc or 'nothing was written to the output path'}",
              file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, old_term)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
