"""``dsv3 serve``'s app: completions (whole and streamed) equal single-request generation, requests
in flight share the engine, bad requests get a clear 4xx."""

import json
import os
import threading

import pytest
import torch

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from dsv3 import Transformer  # noqa: E402
from dsv3.data import Tokenizer  # noqa: E402
from dsv3.infer.generate import generate_text  # noqa: E402
from dsv3.infer.server import create_app  # noqa: E402
from helpers import small_config  # noqa: E402


@pytest.fixture(scope="module")
def served(data_dir):
    torch.manual_seed(0)
    model = Transformer(small_config(vocab_size=2048, max_position_embeddings=128)).eval()
    tok = Tokenizer.from_file(os.path.join(data_dir, "tokenizer.json"))
    with TestClient(create_app(model, tok, "tiny-test", max_batch=3)) as client:
        yield client, model, tok


def test_completion_equals_generate(served):
    client, model, tok = served
    r = client.post("/v1/completions", json={"prompt": "import os\n", "max_tokens": 16, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    ref = generate_text(model, tok, "import os\n", 16, temperature=0)
    assert "import os\n" + body["choices"][0]["text"] == ref
    assert body["choices"][0]["finish_reason"] in ("length", "eos")
    assert body["usage"]["completion_tokens"] <= 16 and body["model"] == "tiny-test"


def test_stream_pieces_add_up(served):
    client, model, tok = served
    req = {"prompt": "def f(x):", "max_tokens": 20, "temperature": 0.8, "top_p": 0.9, "seed": 3}
    whole = client.post("/v1/completions", json=req).json()["choices"][0]["text"]
    with client.stream("POST", "/v1/completions", json={**req, "stream": True}) as r:
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "eos")
    assert whole == generate_text(model, tok, "def f(x):", 20, 0.8, 0, 0.9, seed=3)[len("def f(x):"):]


def test_concurrent_requests_share_the_engine(served):
    client, model, tok = served
    prompts = ["class A:", "for i in", "return ", "x = [", "while True:"]
    out = {}

    def ask(p):
        out[p] = client.post("/v1/completions", json={"prompt": p, "max_tokens": 12, "temperature": 0}).json()

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for p in prompts:
        assert p + out[p]["choices"][0]["text"] == generate_text(model, tok, p, 12, temperature=0)
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["running"] == 0 and health["waiting"] == 0


def test_bad_requests(served):
    client, _, _ = served
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 0})
    assert r.status_code == 422 and "max_tokens" in r.text
    r = client.post("/v1/completions", json={"prompt": "x", "top_p": 1.5})
    assert r.status_code == 422 and "top_p" in r.text
    r = client.post("/v1/completions", json={"prompt": "", "max_tokens": 4})
    assert r.status_code == 400 and "no tokens" in r.text
    r = client.post("/v1/completions", json={"prompt": "y" * 2000, "max_tokens": 4})
    assert r.status_code == 400 and "positions" in r.text
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny-test"


def test_dsv3_serve_command(model_dir, tmp_path):
    import subprocess
    import sys
    import time

    import httpx

    from helpers import cli_env, free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dsv3.cli", "serve", "--model", model_dir, "--port", str(port),
                             "--prefix-cache", str(tmp_path / "kv"), "--prefix-block", "4", "--speculative"],
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else "timeout"
            time.sleep(0.5)
        prompt = "import os, sys, json\nfrom collections import OrderedDict\n"
        texts = []
        for _ in range(2):
            r = httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 8, "temperature": 0},
                           timeout=60)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
            texts.append(r.json()["choices"][0]["text"])
        health = httpx.get(url + "/health", timeout=5).json()
        assert texts[0] == texts[1] and health["prompt_tokens_from_disk_cache"] >= 4   # the second hit disk
        assert health["speculative_acceptance_rate"] is not None
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    r = subprocess.run([sys.executable, "-m", "dsv3.cli", "serve", "--model", model_dir + "-missing"],
                       env=cli_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not found" in r.stderr
