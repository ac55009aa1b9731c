"""`edgemoe serve`, driven by the official `openai` client against real servers (subprocesses
of the `edgemoe` command) on the tiny qwen3_moe Q8_0 GGUF: one with top-any thresholds stored
in the file, one without."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from edgemoe.runtime import serve
from edgemoe.runtime.model import load
from edgemoe.runtime.topany_metadata import write_top_any
from tests.conftest import ROOT

K = 2  # the tiny qwen3_moe's experts per token
CTX = 256


class Server:
    def __init__(self, gguf: Path, log: Path, api_key: str | None = None):
        with socket.socket() as s:  # a free port (released before the server takes it)
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgemoe.supervise", "serve", str(gguf), "--port",
             str(self.port), "--ctx", str(CTX), "--threads", "1",
             *(["--api-key", api_key] if api_key else [])],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log.open("w"),
            env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = api_key or "none"
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.key, max_retries=0,
                                    timeout=60)

    def wait_ready(self, timeout: float = 90) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited: {self.log.read_text()}"
            try:
                self.client.models.list()
                return self
            except openai.APIConnectionError:
                time.sleep(0.3)
        raise AssertionError(f"server not up after {timeout} s: {self.log.read_text()}")

    def get(self, path: str, key: str | None = None) -> str:
        request = urllib.request.Request(self.url + path,
                                         headers={"Authorization": f"Bearer {key or self.key}"})
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.read().decode()

    def metrics(self) -> dict[str, float]:
        return {line.split()[0]: float(line.split()[1])
                for line in self.get("/metrics").splitlines() if not line.startswith("#")}

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def servers(ggufs, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    tau = write_top_any(ggufs["qwen3_q8"], root / "tiny-tau.gguf", [0.5, 0.5])
    # both start at once: their imports and loads overlap
    started = {"tau": Server(tau, root / "tau.log", api_key="sekrit"),
               "plain": Server(ggufs["qwen3_q8"], root / "plain.log")}
    try:
        yield {name: s.wait_ready() for name, s in started.items()}
    finally:
        for s in started.values():
            s.stop()


def chat(client, text: str, **kwargs):
    return client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": text}], max_tokens=8,
        temperature=0, **kwargs)


def test_models_lists_the_model(servers):
    assert [m.id for m in servers["tau"].client.models.list().data] == ["tiny-tau"]
    assert [m.id for m in servers["plain"].client.models.list().data] == ["qwen3-q8_0"]
    for path in ("/v1/models", "/metrics"):  # --api-key: nothing without it
        with pytest.raises(urllib.error.HTTPError) as err:
            servers["tau"].get(path, key="wrong")
        assert err.value.code == 401


def test_chat_completion_and_its_stream(servers):
    client = servers["plain"].client
    r = chat(client, "def quicksort(xs):")
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.prompt_tokens > 3
    assert len(r.choices[0].message.content) > 0
    chunks = list(chat(client, "def quicksort(xs):", stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    # greedy decoding: the streamed text is the text of the plain answer
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == \
        r.choices[0].message.content


def test_eight_concurrent_requests_are_all_answered_in_full(servers):
    client = servers["tau"].client

    def ask(i: int):
        if i % 2:  # a stream is not cut short by the requests queued behind it
            chunks = list(chat(client, f"request {i}: import os", stream=True))
            return chunks[-1].choices[0].finish_reason, chunks[0].id
        r = client.completions.create(model="tiny", prompt=f"request {i}: import os",
                                      max_tokens=8, temperature=0)
        return r.choices[0].finish_reason, r.id

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert all(reason in ("stop", "length") for reason, _ in answers), answers
    assert len({rid for _, rid in answers}) == 8


def test_bad_requests_get_4xx_and_the_server_goes_on(servers):
    s = servers["plain"]
    bad_json = urllib.request.Request(f"{s.url}/v1/chat/completions", data=b'{"messages": [',
                                      headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(bad_json, timeout=30)
    assert err.value.code == 400 and b"invalid_request_error" in err.value.read()
    with pytest.raises(openai.BadRequestError) as err:  # valid JSON, not a chat request
        s.client.chat.completions.create(model="tiny", messages="hello")
    with pytest.raises(openai.BadRequestError) as err:
        s.client.completions.create(model="tiny", prompt="import os\n" * CTX, max_tokens=4)
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as err:  # before the stream's 200
        list(chat(s.client, "import os\n" * CTX, stream=True))
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):  # no BOS added: nothing to evaluate
        s.client.completions.create(model="tiny", prompt="", max_tokens=4)
    assert chat(s.client, "still there?").choices[0].finish_reason in ("stop", "length")


def test_prompt_check_agrees_with_the_model_at_the_context_edge(ggufs):
    llm = load(ggufs["qwen3_q8"], n_ctx=CTX, threads=2)
    # words of 2 tokens: a prompt fits CTX up to 128 of them, a chat message (template) 122
    for method, words in (("create_chat_completion", 120), ("__call__", 126)):
        verdicts = []
        for n in range(words, words + 5):
            text = " ".join(["os"] * n)
            kwargs = ({"messages": [{"role": "user", "content": text}]}
                      if method != "__call__" else {"prompt": text})
            seed, evaluated = llm._seed, llm.n_tokens
            try:
                serve.check_prompt_fits(llm, method, kwargs)
                probe = True
            except ValueError:
                probe = False
            assert (llm._seed, llm.n_tokens) == (seed, evaluated)  # the model was only read
            try:
                getattr(llm, method)(**kwargs, max_tokens=1)
                real = True
            except ValueError:
                real = False
            verdicts.append((probe, real))
        assert all(probe == real for probe, real in verdicts), (method, verdicts)
        assert {True, False} == {real for _, real in verdicts}  # the edge is in the range
    with pytest.raises(serve.EmptyPrompt):
        serve.check_prompt_fits(llm, "__call__", {"prompt": ""})
    with pytest.raises(AssertionError):  # what llama-cpp-python does with it (no BOS here)
        llm("", max_tokens=1)


def test_experts_per_token_reported_below_k_with_thresholds(servers):
    used = {name: chat(s.client, "for line in open(path):").usage.experts_per_token
            for name, s in servers.items()}
    assert used["plain"] == K
    assert 1 <= used["tau"] < K - 0.2, used
    r = servers["tau"].client.completions.create(model="tiny", prompt="x = [", max_tokens=4)
    assert 1 <= r.usage.experts_per_token < K
    plain, tau = servers["plain"].metrics(), servers["tau"].metrics()
    assert plain["edgemoe_experts_per_token"] == K == tau["edgemoe_expert_used_count"]
    assert plain["edgemoe_expert_activations_removed_ratio"] == 0
    assert tau["edgemoe_experts_per_token"] < K - 0.2 and tau["edgemoe_tokens_evaluated_total"] > 0
    assert tau["edgemoe_expert_activations_removed_ratio"] == pytest.approx(
        1 - tau["edgemoe_experts_per_token"] / K, abs=1e-3)
    assert tau['edgemoe_top_any_threshold{layer="1"}'] == 0.5


def test_sigterm_and_ctrl_c_shut_down_cleanly(servers):
    s = servers["tau"]
    assert s.stop(signal.SIGTERM) == 0  # to the supervisor, which passes it on
    assert "Finished server process" in s.log.read_text()
    s = servers["plain"]
    os.killpg(s.proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: the whole job
    assert s.proc.wait(timeout=60) == 0 and "Finished server process" in s.log.read_text()
    with pytest.raises(openai.APIConnectionError):
        s.client.models.list()


def test_missing_server_extra_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # what an absent package looks like
    with pytest.raises(serve.ServeExtraMissing, match=r"pip install 'edgemoe\[serve\]'"):
        serve.create_app("model.gguf")


def test_serve_verb_listens_on_this_machine_only_by_default():
    from edgemoe import cli

    a = vars(cli._parser().parse_args(["serve", "f.gguf"]))
    assert a["func"] is cli.serve and (a["host"], a["port"]) == ("127.0.0.1", 8080)
    a = vars(cli._parser().parse_args(["serve", "f.gguf", "--host", "0.0.0.0", "--top-any",
                                       "off", "--api-key", "k"]))
    assert (a["host"], a["top_any"], a["api_key"]) == ("0.0.0.0", "off", "k")
