"""Disaggregated prefill (``infer/disagg.py``): a real ``dsv3 serve --role prefill`` and a real
``dsv3 serve --role decode --prefill-url …`` sharing an on-disk prefix cache, driven with the official
``openai`` client. Outputs equal the model run in this process; the decode server reads the prompts'
full blocks from disk (its engine computes only the last partial block); a mismatched or unreachable
prefill server is a 503 in OpenAI's error shape, never a silent local prefill."""

import asyncio
import dataclasses
import signal
import subprocess
import sys

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from helpers import cli_env, free_port, save_served_model, wait_healthy  # noqa: E402

KEY = "sk-disagg"
BLOCK = 64          # the server's default cache block


def _serve(model_dir, port, log, *flags):
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "dsv3.cli", "serve", "--model", model_dir, "--port", str(port),
                                 "--threads", "1", "--max-batch", "4", "--api-key", KEY, *flags],
                                env=cli_env(), stdout=out, stderr=subprocess.STDOUT)



def _stop_servers(*procs) -> None:
    """SIGTERM each server still running (a drain), then wait for it; kill what outlives 30 s."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()

@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("disagg")
    model_dir = save_served_model(tmp / "model", seed=5, max_position_embeddings=320)
    cache = str(tmp / "kv")
    pp, dp = free_port(), free_port()
    pre = _serve(model_dir, pp, tmp / "prefill.log", "--role", "prefill", "--prefix-cache", cache)
    dec = _serve(model_dir, dp, tmp / "decode.log", "--role", "decode", "--prefix-cache", cache,
                 "--prefill-url", f"http://127.0.0.1:{pp}")
    try:
        from dsv3.infer.generate import load_model_dir

        model, tok = load_model_dir(model_dir, "cpu")           # the reference, while the servers start
        wait_healthy(f"http://127.0.0.1:{pp}", pre, tmp / "prefill.log", 120, "the prefill server")
        wait_healthy(f"http://127.0.0.1:{dp}", dec, tmp / "decode.log", 120, "the decode server")
        yield dict(model=model.eval(), tok=tok, prefill=f"http://127.0.0.1:{pp}", decode=f"http://127.0.0.1:{dp}",
                   procs=(pre, dec), dir=model_dir, cache=cache)
    finally:
        _stop_servers(dec, pre)


def _health(url):
    return httpx.get(url + "/health", timeout=30).json()


def _answers(url, code: int) -> float:
    """The server's ``dsv3_http_requests_total`` for status ``code`` (its /metrics)."""
    prefix = f'dsv3_http_requests_total{{code="{code}"}} '
    text = httpx.get(url + "/metrics", timeout=30).text
    return next((float(line[len(prefix):]) for line in text.splitlines() if line.startswith(prefix)), 0.0)


def _greedy(pair, text, n):
    from dsv3.infer.generate import generate

    tok = pair["tok"]
    out = generate(pair["model"], tok.encode(text, add_bos=tok.add_bos_token), n, temperature=0, eos_id=tok.stop_ids)
    return tok.decode(out, skip_special_tokens=True)


def _min_greedy_gap(pair, text, n) -> float:
    """The smallest top-1 − top-2 logit gap along the reference's greedy continuation of ``text``."""
    from dsv3.infer.generate import generate

    tok, model = pair["tok"], pair["model"]
    ids = tok.encode(text, add_bos=tok.add_bos_token)
    out = generate(model, ids, n, temperature=0, eos_id=tok.stop_ids)
    with torch.no_grad():
        logits = model(torch.tensor([ids + out]))[0, len(ids) - 1: len(ids) - 1 + len(out)]
    top = logits.topk(2, -1).values
    return float((top[:, 0] - top[:, 1]).min())


def _tie_free_texts(pair, lengths, n, seed):
    """Fresh random prompts whose greedy continuations have no near-tie (a gap of at least 1e-4, a
    hundred times what the servers' batched, chunked, disk-cached fp32 path moves a logit): greedy
    output is only defined up to ties, and this random model has some."""
    g = torch.Generator().manual_seed(seed)
    letters = "abcdefghijklmnopqrstuvwxyz ,.\n"
    texts = []
    for length in lengths:
        for _ in range(20):
            t = "".join(letters[i] for i in torch.randint(0, len(letters), (length,), generator=g).tolist())
            if _min_greedy_gap(pair, t, n) >= 1e-4:
                break
        texts.append(t)
    return texts


def test_outputs_equal_the_model_and_prompts_come_from_disk(pair):
    torch.manual_seed(0)
    c = openai.OpenAI(base_url=pair["decode"] + "/v1", api_key=KEY, max_retries=0, timeout=120)
    name = c.models.list().data[0].id
    texts = _tie_free_texts(pair, (12, 150, 230), 10, torch.seed() % (1 << 31))
    before = _health(pair["decode"])["prefix_hit_tokens_disk"]
    r = c.completions.create(model=name, prompt=texts, max_tokens=10, temperature=0)
    assert [ch.text for ch in r.choices] == [_greedy(pair, t, 10) for t in texts]
    # the two long prompts' full blocks were computed by the prefill server and read back from disk
    ids = [len(pair["tok"].encode(t, add_bos=pair["tok"].add_bos_token)) for t in texts]
    expect = sum((n - 1) // BLOCK * BLOCK for n in ids)
    assert _health(pair["decode"])["prefix_hit_tokens_disk"] - before >= expect > 0
    assert _health(pair["prefill"])["prompt_tokens"] >= ids[1] + ids[2]
    assert r.usage.prompt_tokens_details.cached_tokens >= expect
    # streamed and chat requests take the same path
    s = "".join(ch.choices[0].text for ch in c.completions.create(model=name, prompt=texts[2], max_tokens=10,
                                                                     temperature=0, stream=True) if ch.choices)
    assert s == r.choices[2].text
    chat = c.chat.completions.create(model=name, messages=[{"role": "user", "content": texts[1]}], max_tokens=6,
                                     temperature=0)
    assert chat.choices[0].finish_reason in ("length", "stop")


def test_the_prefill_endpoint_needs_the_key_and_checks_its_input(pair):
    url = pair["prefill"] + "/internal/prefill"
    assert httpx.post(url, json={"prompts": [[1, 2, 3]]}, timeout=30).status_code == 401
    auth = {"Authorization": f"Bearer {KEY}"}
    for body in ({"prompts": []}, {"prompts": [["a"]]}, {"prompts": "x"}, {"prompts": [[1, 2, 10**9]]}):
        r = httpx.post(url, json=body, headers=auth, timeout=30)
        assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text
    r = httpx.post(url, json={"prompts": [list(range(1, 100))]}, headers=auth, timeout=60)
    assert r.status_code == 200 and r.json()["prompt_tokens"] == 99


def test_a_mismatched_prefill_server_is_a_503(pair):
    from dsv3.infer.disagg import RemotePrefill
    from dsv3.infer.engine import EngineLimits
    from dsv3.infer.openai_protocol import APIError

    theirs = _health(pair["prefill"])
    limits = EngineLimits(320, 300, BLOCK, 10, 1, "another-model/3/1/64")
    remote = RemotePrefill(pair["prefill"], 30, limits, KEY)
    with pytest.raises(APIError) as e:
        asyncio.run(remote([list(range(1, 150))]))
    assert e.value.status == 503 and e.value.code == "prefill_mismatch" and "--speculative" in str(e.value)
    assert theirs["status"] == "ok"
    ok = RemotePrefill(pair["prefill"], 30, dataclasses.replace(limits, prefix_cache=None), "wrong-key")
    with pytest.raises(APIError) as e:
        asyncio.run(ok([list(range(1, 150))]))
    assert e.value.status == 503 and e.value.code == "prefill_unavailable" and "401" in str(e.value)


NARROW_BODY = 4096


@pytest.fixture(scope="module")
def narrow(pair, tmp_path_factory):
    """A prefill server whose cache pool holds 4 blocks (256 positions) and a decode server with the
    whole context (320): the deployment takes prompts the decode server alone could. The prefill server's
    --max-body-bytes is small (4096): what the decode server forwards may be larger."""
    tmp = tmp_path_factory.mktemp("narrow")
    cache = str(tmp / "kv")
    pp, dp = free_port(), free_port()
    pre = _serve(pair["dir"], pp, tmp / "prefill.log", "--role", "prefill", "--prefix-cache", cache,
                 "--cache-memory", "0.00007", "--max-body-bytes", str(NARROW_BODY))
    dec = _serve(pair["dir"], dp, tmp / "decode.log", "--role", "decode", "--prefix-cache", cache,
                 "--prefill-url", f"http://127.0.0.1:{pp}", "--shutdown-grace", "1")
    try:
        wait_healthy(f"http://127.0.0.1:{pp}", pre, tmp / "prefill.log", 120, "the prefill server")
        wait_healthy(f"http://127.0.0.1:{dp}", dec, tmp / "decode.log", 120, "the decode server")
        yield dict(prefill=f"http://127.0.0.1:{pp}", decode=f"http://127.0.0.1:{dp}", procs=(pre, dec),
                   logs=(tmp / "prefill.log", tmp / "decode.log"), dir=pair["dir"])
    finally:
        _stop_servers(dec, pre)


def test_a_prompt_the_prefill_server_cannot_hold_is_a_400_naming_the_field(pair, narrow):
    c = openai.OpenAI(base_url=narrow["decode"] + "/v1", api_key=KEY, max_retries=0, timeout=120)
    name = c.models.list().data[0].id
    for call, param in ((lambda: c.completions.create(model=name, prompt="y" * 280, max_tokens=4, temperature=0),
                         "prompt"),
                        (lambda: c.chat.completions.create(model=name, messages=[{"role": "user", "content": "y" * 280}],
                                                           max_tokens=4, temperature=0), "messages")):
        with pytest.raises(openai.BadRequestError) as e:
            call()
        err = e.value.body
        assert err["code"] == "context_length_exceeded" and err["param"] == param, err
        assert "prefill server" in err["message"] and "256" in err["message"], err
        assert e.value.response.json()["error"]["type"] == "invalid_request_error"
    # a prompt both can hold is served, and the decode server keeps serving
    r = c.completions.create(model=name, prompt="y" * 150, max_tokens=4, temperature=0)
    assert r.choices[0].text == _greedy(pair, "y" * 150, 4)
    assert _health(narrow["decode"])["status"] == "ok"


def test_the_decode_server_reports_and_keeps_the_prefill_servers_prompt_limit(narrow):
    """The narrow deployment takes prompts of at most 255 tokens (its prefill server's pool holds 256
    positions; the decode server alone 320): /v1/models says 256, and the decode server refuses a longer
    prompt itself (400 naming the field) without sending it to the prefill server."""
    c = openai.OpenAI(base_url=narrow["decode"] + "/v1", api_key=KEY, max_retries=0, timeout=120)
    card = c.models.list().data[0]
    assert card.to_dict()["max_model_len"] == 256
    assert c.models.retrieve(card.id).to_dict()["max_model_len"] == 256
    refused = _answers(narrow["prefill"], 400)
    for call, param in ((lambda: c.completions.create(model=card.id, prompt=[7] * 256, max_tokens=2), "prompt"),
                        (lambda: c.chat.completions.create(model=card.id, max_tokens=2,
                                                           messages=[{"role": "user", "content": "y" * 270}]),
                         "messages")):
        with pytest.raises(openai.BadRequestError) as e:
            call()
        err = e.value.body
        assert err["code"] == "context_length_exceeded" and err["param"] == param, err
        assert "prefill server takes prompts of at most 255" in err["message"], err
    assert _answers(narrow["prefill"], 400) == refused             # refused by the decode server itself
    r = c.completions.create(model=card.id, prompt=[7] * 255, max_tokens=2, temperature=0)    # the longest
    assert r.usage.prompt_tokens == 255 and r.usage.completion_tokens == 2


def test_the_prefill_route_takes_what_a_decode_server_forwards(narrow):
    """The decode server forwards prompts as token ids, which take more bytes as JSON than the client's
    text did: the prefill server takes bodies up to what 64 of its longest prompts need, even past its
    --max-body-bytes (4096 here), and refuses only larger ones (413)."""
    import json
    import random

    from dsv3.infer.generate import load_tokenizer

    # 12 prompts of text (a body of about 2 kB) become 12 token-id lists (over 4096 bytes) for the prefill server
    rng = random.Random(0)
    texts = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(170)) for _ in range(12)]
    tok = load_tokenizer(narrow["dir"])
    ids = [tok.encode(t, add_bos=tok.add_bos_token) for t in texts]
    assert len(json.dumps({"prompts": ids}, separators=(",", ":"))) > NARROW_BODY > len(json.dumps(texts)) + 200
    c = openai.OpenAI(base_url=narrow["decode"] + "/v1", api_key=KEY, max_retries=0, timeout=120)
    r = c.completions.create(model=c.models.list().data[0].id, prompt=texts, max_tokens=1, temperature=0)
    assert len(r.choices) == 12 and r.usage.prompt_tokens_details.cached_tokens >= 12 * BLOCK
    # the bound holds the widest body a decode server can send, as httpx or json.dumps (", ") writes it
    from dsv3.infer.disagg import prefill_body_limit

    widest = {"prompts": [[299] * 255] * 64}
    bound = prefill_body_limit(255, 300, NARROW_BODY)
    assert len(json.dumps(widest)) <= bound < 1.1 * len(json.dumps(widest))
    assert prefill_body_limit(255, 300, 10 ** 7) == 10 ** 7
    # the route's limit is that bound: a larger body is a 413 naming it
    auth = {"Authorization": f"Bearer {KEY}"}
    big = json.dumps({"prompts": [[1] * ((bound - 12) // 2)]}, separators=(",", ":"))
    assert len(big) > bound
    r = httpx.post(narrow["prefill"] + "/internal/prefill", content=big, headers=auth, timeout=60)
    assert r.status_code == 413 and f"the limit is {bound} (64 prompts" in r.json()["error"]["message"], r.text


def test_a_client_gone_while_the_prefill_server_works_cancels_the_remote_prefill(narrow):
    """The client disconnects while the decode server waits for a (stalled) prefill server: the decode
    server gives up at once (499, the prefill server still stopped) and closes its call to the prefill
    server, which then drops the prompt (its own 499) instead of computing it for nobody; both keep serving."""
    import os
    import time

    pre, _ = narrow["procs"]
    c = openai.OpenAI(base_url=narrow["decode"] + "/v1", api_key=KEY, max_retries=0, timeout=60)
    name = c.models.list().data[0].id
    gone = {u: _answers(narrow[u], 499) for u in ("prefill", "decode")}
    os.kill(pre.pid, signal.SIGSTOP)
    try:
        with pytest.raises(openai.APITimeoutError):         # the client gives up after 1 s and disconnects
            c.with_options(timeout=1.0).completions.create(model=name, prompt="q" * 150, max_tokens=4, temperature=0)
        deadline = time.time() + 10
        while _answers(narrow["decode"], 499) == gone["decode"]:
            assert time.time() < deadline, "the decode server still waits for the prefill server"
            time.sleep(0.1)
    finally:
        os.kill(pre.pid, signal.SIGCONT)
    deadline = time.time() + 10
    while _answers(narrow["prefill"], 499) == gone["prefill"]:      # its client (the decode server) went away
        assert time.time() < deadline, "the prefill server was not told: it answered the abandoned prompt"
        time.sleep(0.1)
    r = c.completions.create(model=name, prompt="q" * 150, max_tokens=2, temperature=0)
    assert r.choices[0].finish_reason == "length"
    assert _health(narrow["prefill"])["status"] == _health(narrow["decode"])["status"] == "ok"


def test_a_drain_that_runs_out_while_the_prefill_server_works_answers_503(narrow):
    """SIGTERM on the decode server while a request waits for a (stalled) prefill server: once
    --shutdown-grace (1 s) has run out the client gets a 503 in OpenAI's shape, not a cut connection."""
    import os
    import threading
    import time

    pre, dec = narrow["procs"]
    c = openai.OpenAI(base_url=narrow["decode"] + "/v1", api_key=KEY, max_retries=0, timeout=60)
    name = c.models.list().data[0].id
    out = {}

    def ask():
        try:
            out["r"] = c.completions.create(model=name, prompt="z" * 150, max_tokens=4, temperature=0)
        except openai.OpenAIError as e:
            out["r"] = e

    os.kill(pre.pid, signal.SIGSTOP)                  # the prefill server takes the request and stalls
    try:
        t = threading.Thread(target=ask)
        t.start()
        time.sleep(1.0)
        dec.send_signal(signal.SIGTERM)
        start = time.time()
        t.join(30)
        err = out.get("r")
        assert isinstance(err, openai.APIStatusError) and err.status_code == 503, err
        assert err.body["code"] == "shutting_down" and "--shutdown-grace" in err.body["message"], err.body
        assert time.time() - start < 8
        assert dec.wait(30) == 0
    finally:
        os.kill(pre.pid, signal.SIGCONT)


def test_a_decode_server_on_other_storage_is_a_503_not_a_silent_local_prefill(pair, tmp_path):
    """--prefix-cache pointing at different storage on the two servers (a typo, a mount missing on one
    machine): the prefill server computes every prompt for nothing and the decode server, finding no
    block, would prefill it again itself. The decode server checks the prompt's first block is there."""
    from dsv3.infer.disagg import RemotePrefill
    from dsv3.infer.engine import EngineLimits
    from dsv3.infer.openai_protocol import APIError

    auth = {"Authorization": f"Bearer {KEY}"}
    theirs = httpx.post(pair["prefill"] + "/internal/prefill", json={"prompts": [[5] * 70]}, headers=auth,
                        timeout=60).json()["prefix_cache"]
    limits = EngineLimits(320, 300, BLOCK, 10, 0, theirs)
    prompt = list(range(1, 150))
    elsewhere = RemotePrefill(pair["prefill"], 30, limits, KEY, str(tmp_path / "other-kv"))
    with pytest.raises(APIError) as e:
        asyncio.run(elsewhere([prompt]))
    assert e.value.status == 503 and e.value.code == "prefill_mismatch", e.value
    assert "--prefix-cache" in str(e.value) and str(tmp_path / "other-kv") in str(e.value)
    shared = RemotePrefill(pair["prefill"], 30, limits, KEY, pair["cache"])
    asyncio.run(shared([prompt]))                 # the same storage: the blocks are found


def test_a_decode_server_refuses_to_start_beside_an_unfit_prefill_server(pair):
    """Another model or --speculative on one side only: every long prompt would get 503 prefill_mismatch,
    so the decode server says so when it starts (one line naming the flag, exit code 2)."""
    r = subprocess.run([sys.executable, "-m", "dsv3.cli", "serve", "--model", pair["dir"], "--port", str(free_port()),
                        "--threads", "1", "--max-batch", "2", "--api-key", KEY, "--role", "decode", "--speculative",
                        "--prefix-cache", pair["cache"], "--prefill-url", pair["prefill"]],
                       env=cli_env(), capture_output=True, text=True, timeout=90)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "the prefill server builds cache blocks" in err[-1], r.stderr
    assert "--prefill-url" in err[-1] and "--speculative" in err[-1], r.stderr


def test_the_start_check_names_what_is_wrong(pair):
    from dsv3.infer.disagg import RemotePrefill
    from dsv3.infer.engine import EngineLimits

    auth = {"Authorization": f"Bearer {KEY}"}
    layout = httpx.get(pair["prefill"] + "/internal/prefill", headers=auth, timeout=30).json()
    assert set(layout) == {"prefix_cache", "max_prompt_len"} and layout["max_prompt_len"] == 319
    limits = EngineLimits(320, 300, BLOCK, 10, 0, layout["prefix_cache"])
    warned = []
    RemotePrefill(pair["prefill"], 30, limits, KEY).check_at_start(warned.append)          # fit: silent
    assert warned == []
    for url, key, words in ((pair["decode"], KEY, "not a dsv3 serve --role prefill server"),
                            (pair["prefill"], "wrong-key", "--api-key: the prefill server")):
        with pytest.raises(ValueError, match=words):
            RemotePrefill(url, 30, limits, key).check_at_start(warned.append)
    RemotePrefill(f"http://127.0.0.1:{free_port()}", 30, limits, KEY).check_at_start(warned.append)
    assert len(warned) == 1 and "cannot be reached yet" in warned[0]


def test_without_the_prefill_server_long_prompts_get_503_short_ones_are_served(pair):
    pre, _ = pair["procs"]
    pre.send_signal(signal.SIGTERM)
    pre.wait(timeout=60)
    c = openai.OpenAI(base_url=pair["decode"] + "/v1", api_key=KEY, max_retries=0, timeout=120)
    name = c.models.list().data[0].id
    with pytest.raises(openai.APIStatusError) as e:
        c.completions.create(model=name, prompt="x" * 200, max_tokens=4, temperature=0)
    assert e.value.status_code == 503 and e.value.body["code"] == "prefill_unavailable"
    short = c.completions.create(model=name, prompt="short", max_tokens=4, temperature=0)
    assert short.choices[0].text == _greedy(pair, "short", 4)
    assert _health(pair["decode"])["status"] == "ok"


@pytest.mark.parametrize("argv, line", [
    (["--role", "decode", "--prefix-cache", "{tmp}"], "--role decode: needs --prefill-url"),
    (["--role", "prefill"], "--role prefill: needs --prefix-cache"),
    (["--prefill-url", "http://127.0.0.1:1"], "--prefill-url needs --role decode"),
    (["--role", "prefill", "--prefix-cache", "{tmp}", "--prefill-url", "http://x:1"], "--prefill-url: only for"),
    (["--role", "prefill", "--prefix-cache", "{tmp}", "--prefill-timeout", "5"], "--prefill-timeout: only for"),
    (["--prefill-timeout", "600"], "--prefill-timeout needs --role decode"),
    (["--role", "decode", "--prefix-cache", "{tmp}", "--prefill-url", "localhost:8001"], "expected http://host:port"),
    (["--role", "decode", "--prefix-cache", "{tmp}", "--prefill-url", "http://x:1", "--prefill-timeout", "0"],
     "--prefill-timeout 0.0: must be a positive"),
])
def test_bad_role_flags_are_one_line_exit_2(pair, tmp_path, capsys, argv, line):
    from dsv3.cli import main

    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(["serve", "--model", pair["dir"], "--port", str(free_port()), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and line in err, err
