"""`edgemoe serve`: an OpenAI-compatible HTTP server for a GGUF, top-any thresholds active.

It is llama-cpp-python's own server (`llama_cpp.server`: its routes `/v1/completions`,
`/v1/chat/completions` with streaming, `/v1/models`, its request types, OpenAI-style errors
and the lock that serves one request at a time), with edgemoe's runtime model plugged into
its `LlamaProxy`: the GGUF is opened by `edgemoe.runtime.model.load` (edgemoe's llama.cpp
load policy, the thresholds stored in the file or given by `top_any`), and expert use is
always counted. Reported:
- in each non-streamed completion, `usage.experts_per_token`: experts computed per token
  and MoE layer over the tokens that request evaluated (k without thresholds);
- at `GET /metrics`, Prometheus text: the same since the server started, tokens evaluated,
  the share of expert activations removed, per-layer figures and the thresholds.

Where llama-cpp-python's server answers a bad request with a 500 (bad JSON, a body of the
wrong shape, a prompt of no tokens) or a 200 (a streamed prompt longer than the context),
this one answers 400 before anything is sent.

llama-cpp-python's server keeps its model and settings in module globals: one app per
process. Needs the `serve` extra: pip install 'edgemoe[serve]'.
"""

import os
from collections.abc import Sequence
from pathlib import Path

from ..calibration.hooks import EvalHooks
from .model import RunSettings, load, planned_settings

DEFAULT_HOST = "127.0.0.1"  # local only unless asked: the API has no key by default
DEFAULT_PORT = 8080  # llama-server's
INSTALL_HINT = "pip install 'edgemoe[serve]'"


class ServeExtraMissing(RuntimeError):
    """The server's dependencies (FastAPI, uvicorn, ...) are not installed."""


def _server_modules():
    """llama-cpp-python's server package and uvicorn, or a message naming the extra."""
    try:
        import uvicorn
        from llama_cpp.server import app as server_app
        from llama_cpp.server import model as server_model
        from llama_cpp.server import settings as server_settings
    except ImportError as exc:
        raise ServeExtraMissing(f"`edgemoe serve` needs {exc.name or 'a module'}, which is "
                                f"not installed: {INSTALL_HINT}") from exc
    return server_app, server_model, server_settings, uvicorn


def create_app(path: str | Path, top_any: str | float | Sequence[float] | None = None,
               threads: int | None = None, alias: str | None = None,
               api_key: str | None = None, run: RunSettings | None = None):
    """llama-cpp-python's FastAPI app serving `path` as edgemoe's runtime model, plus
    `GET /metrics`. `top_any` as in `load`; `alias` is the model id `/v1/models` lists
    (default: the file name without .gguf); with `api_key`, requests need that bearer key.
    `run`: context, KV cache and batches (default: `planned_settings(path)`, those the
    file's plan was made for)."""
    server_app, server_model, settings, _ = _server_modules()
    from fastapi import Depends, FastAPI, Response
    from fastapi.middleware import Middleware
    from fastapi.middleware.cors import CORSMiddleware
    from starlette_context.middleware import RawContextMiddleware
    from starlette_context.plugins import RequestIdPlugin

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, "No such file", str(path))
    run = run or planned_settings(path)

    class EdgeLlamaProxy(server_model.LlamaProxy):
        """llama-cpp-python's model holder, opening its model with edgemoe's `load`."""

        def load_llama_from_model_settings(self, model: settings.ModelSettings):
            # only fields given below are read: the others could come from the environment
            # (an EvalHooks makes load count expert use even without thresholds)
            return load(model.model, top_any=top_any, threads=model.n_threads,
                        hooks=EvalHooks(), **run.llama_kwargs())

    # explicit values: these are pydantic BaseSettings, which would read HOST, API_KEY, SEED
    # ... from the environment for anything left out
    server = settings.ServerSettings(
        host=DEFAULT_HOST, port=DEFAULT_PORT, api_key=api_key, root_path="",
        # llama-cpp-python's default cuts a running stream short when another request
        # arrives; every request must be answered in full
        interrupt_requests=False)
    threads = threads or os.cpu_count() or 1
    model = settings.ModelSettings(
        model=str(path), model_alias=alias or path.name.removesuffix(".gguf"), n_ctx=run.ctx,
        n_threads=threads, n_threads_batch=threads, verbose=False)
    proxy = EdgeLlamaProxy([model])

    # what llama_cpp.server.app.create_app does, with our proxy in place of the one it would
    # build from the settings (and load a second time, with plain llama_cpp.Llama)
    server_app.set_server_settings(server)
    server_app._llama_proxy = proxy
    app = FastAPI(middleware=[Middleware(RawContextMiddleware, plugins=(RequestIdPlugin(),))],
                  title="edgemoe serve", version=_version())
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_credentials=True,
                       allow_methods=["*"], allow_headers=["*"])
    app.include_router(_router(server_app, proxy))

    @app.get("/metrics", tags=["edgemoe"], response_class=Response, response_model=None,
             dependencies=[Depends(server_app.authenticate)])  # the API key, if one is set
    def metrics():
        return Response(metrics_text(proxy()), media_type="text/plain; version=0.0.4")

    app.state.proxy = proxy
    return app


def _router(server_app, proxy):
    """llama-cpp-python's routes and handlers, under `_route_class()`. The completion routes
    go without their response model, whose validation would drop `usage.experts_per_token`,
    and check the prompt's length before anything is sent (`_prompt_check`)."""
    from fastapi import APIRouter, Depends
    from llama_cpp.server import types

    calls = {server_app.create_completion: (types.CreateCompletionRequest, "__call__"),
             server_app.create_chat_completion: (types.CreateChatCompletionRequest,
                                                 "create_chat_completion")}
    router = APIRouter(route_class=_route_class())
    for route in server_app.router.routes:
        completion = calls.get(route.endpoint)
        checks = [Depends(_prompt_check(proxy, *completion))] if completion else []
        router.add_api_route(
            route.path, route.endpoint, methods=list(route.methods),
            dependencies=[*route.dependencies, *checks], summary=route.summary,
            tags=route.tags, response_model=None if completion else route.response_model,
            include_in_schema=route.include_in_schema)
    return router


def _prompt_check(proxy, request_type, method: str):
    """A route dependency: a prompt longer than the context gets llama-cpp-python's own 400
    (context_length_exceeded) also when streamed, where the error would otherwise come after
    the stream's 200, as an empty stream; a prompt of no tokens gets a 400 (llama-cpp-python
    fails an assertion on it, a 500, where the model adds no BOS: Qwen's do not)."""
    from fastapi import HTTPException, Request
    from starlette.concurrency import run_in_threadpool

    async def check(request: Request) -> None:
        try:
            body = request_type.model_validate(await request.json())
        except Exception:  # FastAPI's own validation of the body answers it
            return
        # as the route passes them, less what only changes sampling
        kwargs = body.model_dump(exclude=_NOT_LLAMA_ARGS | {"logit_bias", "grammar"})
        if isinstance(kwargs.get("prompt"), list):  # as the route takes it
            kwargs["prompt"] = kwargs["prompt"][0] if kwargs["prompt"] else ""
        try:
            await run_in_threadpool(check_prompt_fits, proxy(body.model), method, kwargs)
        except EmptyPrompt as exc:
            raise HTTPException(400, str(exc)) from exc

    return check


# request fields that llama-cpp-python's routes do not pass to the model
_NOT_LLAMA_ARGS = {"n", "best_of", "logit_bias_type", "user", "min_tokens"}


class EmptyPrompt(ValueError):
    """The prompt has no tokens to evaluate."""


class _PromptFits(Exception):
    pass


def check_prompt_fits(llm, method: str, kwargs: dict) -> None:
    """Run llama-cpp-python's `Llama.<method>(**kwargs)` (its chat template, tokenization and
    context check) on a stand-in for `llm` that stops where evaluation would start; raises
    llama-cpp-python's ValueError when the prompt does not fit, `EmptyPrompt` when it has no
    tokens. `llm` is only read."""
    import llama_cpp

    class Probe:
        __call__ = llama_cpp.Llama.__call__
        create_chat_completion = llama_cpp.Llama.create_chat_completion
        create_completion = llama_cpp.Llama.create_completion
        _create_completion = llama_cpp.Llama._create_completion
        cache = None  # no state loaded from a prompt cache

        def __getattr__(self, name):  # tokenizer, metadata, chat handlers, n_ctx: the model's
            return getattr(llm, name)

        def set_seed(self, seed):  # the model's sampler seed stays as it is
            pass

        def generate(self, tokens, *args, **kwargs):  # reached once the prompt fits
            if not len(tokens):
                raise EmptyPrompt("the prompt has no tokens")
            raise _PromptFits()

    try:
        next(iter(getattr(Probe(), method)(**{**kwargs, "stream": True})))
    except _PromptFits:
        pass


def _route_class():
    """llama-cpp-python's route class (OpenAI-style error bodies), answering an invalid
    request body with 400 where it answers 500: its error handler reads the body again as
    JSON, which fails on bad JSON, and has no case for a body that does not validate."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from fastapi.routing import APIRoute
    from llama_cpp.server.errors import RouteErrorHandler

    class InvalidBodyIs400(APIRoute):
        def get_route_handler(self):
            handler = super().get_route_handler()

            async def checked(request):
                try:
                    return await handler(request)
                except RequestValidationError as exc:
                    problems = "; ".join(
                        f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}"
                        for e in exc.errors())
                    return JSONResponse({"error": {
                        "message": f"invalid request body: {problems}",
                        "type": "invalid_request_error", "param": None, "code": None}},
                        status_code=400)

            return checked

    # RouteErrorHandler's handler wraps the next class's in the MRO: this one
    class EdgeRoute(RouteErrorHandler, InvalidBodyIs400):
        pass

    return EdgeRoute


def _startup_error(exc: SystemExit) -> str:
    """What stopped uvicorn's start: it calls sys.exit while handling the error."""
    cause = exc.__context__
    return str(cause) if cause is not None else "see the message above"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edgemoe")
    except PackageNotFoundError:
        return "unknown"


def metrics_text(llm) -> str:
    """Expert use of an edgemoe runtime model since it was loaded, as Prometheus text."""
    use = llm.expert_use.snapshot()
    arch = llm.metadata.get("general.architecture", "")
    k = llm.metadata.get(f"{arch}.expert_used_count")
    rows = [
        ("edgemoe_tokens_evaluated_total", "counter",
         "Tokens evaluated (prompt and generated) since the server started.",
         [("", max(use.tokens.values(), default=0))]),
        ("edgemoe_experts_per_token", "gauge",
         "Routed experts computed per token and MoE layer since the server started.",
         [("", use.experts_per_token)]),
        ("edgemoe_expert_used_count", "gauge",
         "Experts the router selects per token (k), from the GGUF.",
         [("", k)] if k is not None else []),
        ("edgemoe_expert_activations_removed_ratio", "gauge",
         "Share of the k selected experts that top-any thresholds removed.",
         [("", use.removed_share)]),
        ("edgemoe_layer_experts_per_token", "gauge",
         "Routed experts computed per token in each MoE layer.",
         [(f'{{layer="{li}"}}', use.kept[li] / n) for li, n in sorted(use.tokens.items())
          if n]),
        ("edgemoe_top_any_threshold", "gauge",
         "Top-any threshold tau per block (0: all k experts kept).",
         [(f'{{layer="{li}"}}', float(t)) for li, t in enumerate(llm.thresholds)]),
    ]
    lines = []
    for name, kind, help_text, samples in rows:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        lines += [f"{name}{labels} {_number(v)}" for labels, v in samples]
    return "\n".join(lines) + "\n"


def _number(v) -> str:
    return str(int(v)) if float(v).is_integer() else f"{float(v):.6g}"


def thresholds_summary(app) -> str:
    """The served model's top-any thresholds in a few words."""
    tau = app.state.proxy().thresholds
    on = tau[tau > 0]
    if not on.size:
        return "top-any off"
    span = f"{on.min():.3g}" if on.min() == on.max() else f"{on.min():.3g}-{on.max():.3g}"
    return f"top-any tau {span} in {on.size} of {tau.size} blocks"


def run(app, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, log_level: str = "info"):
    """Serve `app` (from `create_app`) until SIGINT or SIGTERM, then shut down cleanly: no
    new connections, running requests answered, the model closed."""
    *_, uvicorn = _server_modules()
    from llama_cpp.server import app as server_app

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=30))
    try:
        server.run()
    except SystemExit as exc:  # uvicorn's exit on a failed start (the port taken, ...)
        raise OSError(f"the server could not start: {_startup_error(exc)}") from exc
    except KeyboardInterrupt:
        # uvicorn handles SIGINT/SIGTERM itself and, once shut down, raises the signal again
        # for the previous handler: the shutdown is done
        pass
    finally:
        # a generation still running (past the graceful timeout) keeps using the model
        if not server_app.llama_inner_lock.locked():
            app.state.proxy.free()
