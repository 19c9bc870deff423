"""``dsv3 serve`` with a speculative engine and a cache pool smaller than the context, as a client
meets it (a real server process, the official ``openai`` client and httpx).

Speculative steps hand two tokens at once to the server, so a stop string can end the answer in the
middle of what arrived; and a pool that holds fewer positions than the model's context bounds every
request (and runs one request at a time, so others wait); a client that does not send its whole body
in time gets a 408, one that does not send its headers in time has its connection closed. One server for
the module, with ``--shutdown-grace 0``, ``--body-timeout 1.5`` and ``--header-timeout 2``; the last test
stops it.
"""

import json
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from helpers import cli_env, free_port, wait_healthy  # noqa: E402

NAME = "spec-model"
BODY_TIMEOUT = 1.5
HEADER_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def spec(model_dir, tmp_path_factory):
    """(openai client, httpx client, tokenizer, pool positions): ``dsv3 serve --speculative`` with a
    pool of one 64-token block (the context is 128)."""
    from dsv3.hf import check_model_dir
    from dsv3.infer.generate import load_tokenizer
    from dsv3.infer.paged_cache import PagedLatentCache

    cfg = check_model_dir(model_dir)
    per_block = PagedLatentCache.bytes_per_block(cfg, 64, cfg.num_hidden_layers + 1)       # + the MTP layer
    assert cfg.max_position_embeddings == 128
    port, log = free_port(), tmp_path_factory.mktemp("serve-spec") / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dsv3.cli", "serve", "--model", model_dir, "--port", str(port),
                                 "--max-batch", "4", "--served-model-name", NAME, "--speculative", "--shutdown-grace", "0",
                                 "--body-timeout", str(BODY_TIMEOUT), "--header-timeout", str(HEADER_TIMEOUT),
                                 "--cache-memory", f"{1.5 * per_block / (1 << 30):.10g}"],
                                env=cli_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        tok = load_tokenizer(model_dir)
        wait_healthy(url, proc, log, 120)
        yield (openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120),
               httpx.Client(base_url=url, timeout=120), tok, 64 - 1, log, proc)
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_usage_stops_at_the_stop_string(spec):
    """A stop string completed by the first of two tokens that arrived together: usage (whole, streamed,
    chat) counts the tokens of the answer, as many as its logprobs list, not the ones the engine made
    before the abort reached it."""
    client, _, tok, _, _, _ = spec
    x = tok.encode(" value")[0]
    word = tok.decode([x])
    # forced: every draft is accepted, so after the prefill's token each step brings two
    args = dict(model=NAME, prompt="z", max_tokens=12, temperature=0, logit_bias={str(x): 100}, stop=word[-1] + word)
    r = client.completions.create(**args, logprobs=0)
    ch = r.choices[0]
    assert ch.text == word[:-1] and ch.finish_reason == "stop" and len(ch.logprobs.tokens) == 2, ch
    assert r.usage.completion_tokens == 2, r.usage
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == word[:-1]
    assert chunks[-1].usage.completion_tokens == 2, chunks[-1].usage
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "z"}], max_tokens=12,
                                          temperature=0, logit_bias={str(x): 100}, stop=word[-1] + word,
                                          logprobs=True)
    assert chat.choices[0].message.content == word[:-1] and len(chat.choices[0].logprobs.content) == 2
    assert chat.usage.completion_tokens == 2, chat.usage


def test_a_pool_smaller_than_the_context_bounds_requests(spec):
    """The pool holds 63 positions of one request (one 64-token block, one of lookahead) although the
    context is 128: /v1/models says so, a request for more gets a 400 naming max_tokens before any
    work (not a 500 once the pool is full), and a chat request without max_tokens gets what fits."""
    client, http, tok, positions, log, _ = spec
    assert client.models.retrieve(NAME).model_extra["max_model_len"] == positions
    assert f"requests are limited to {positions} tokens" in log.read_text()
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="z", max_tokens=100)
    assert e.value.body["param"] == "max_tokens" and e.value.body["code"] == "context_length_exceeded"
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "z"}], temperature=0,
                                       logit_bias={str(tok.eos_id): -100})
    assert r.choices[0].finish_reason == "length" and r.usage.total_tokens == positions, r.usage
    body = {"model": NAME, "messages": [{"role": "user", "content": "z"}], "stream": True,
            "logit_bias": {str(tok.eos_id): -100}}
    events = [line[6:] for line in http.post("/v1/chat/completions", json=body).text.splitlines()
              if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and not any("error" in json.loads(e) for e in events[:-1]), events[-3:]


def test_a_body_that_does_not_arrive_in_time_gets_408(spec):
    """A client that sends its headers and part of its body, then nothing (or a trickle that would take too
    long), held its request for ever: after --body-timeout it gets a 408 in OpenAI's shape and its
    connection is closed, while the server goes on answering others (also meanwhile)."""
    client, http, _, _, _, _ = spec
    port = http.base_url.port
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n")
    for trickle in (False, True):
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            t0 = time.monotonic()
            s.sendall(head + b'{"prompt":')                 # 10 of the 1000 bytes, then silence
            r = client.completions.create(model=NAME, prompt="x", max_tokens=2)     # meanwhile: served
            assert r.usage.completion_tokens == 2
            while trickle and time.monotonic() - t0 < 2 * BODY_TIMEOUT and not select.select([s], [], [], 0.1)[0]:
                s.sendall(b" ")                              # a byte every 0.1 s until the answer comes
            answer = b""
            try:
                while chunk := s.recv(65536):                # until the server closes the connection
                    answer += chunk
            except ConnectionResetError:                     # closed with trickled bytes unread: the answer came
                pass
            waited = time.monotonic() - t0
        status, _, rest = answer.partition(b"\r\n")
        headers, _, body = rest.partition(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 408"), answer
        assert b"connection: close" in headers.lower(), headers
        err = json.loads(body)["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["code"] == "request_timeout", err
        assert "--body-timeout" in err["message"] and ("10 of 1000 bytes" in err["message"]) != trickle, err
        assert BODY_TIMEOUT <= waited < BODY_TIMEOUT + 10, waited
    assert client.completions.create(model=NAME, prompt="x", max_tokens=2).usage.completion_tokens == 2
    assert 'dsv3_http_requests_total{code="408"} 2.0' in http.get("/metrics").text


def _until_closed(s: socket.socket) -> tuple[bytes, float]:
    """What the server sends on ``s`` until it closes the connection, and when that was (time.monotonic())."""
    answer = b""
    try:
        while chunk := s.recv(65536):
            answer += chunk
    except ConnectionResetError:
        pass
    return answer, time.monotonic()


def test_stalled_headers_are_cut_off_while_others_are_served(spec):
    """Clients that open a connection and send part of a request's headers (on a new connection, or on one
    kept alive after an answer), or nothing, and then wait, held their connections for ever: uvicorn sets no
    limit on headers and --body-timeout starts after them. Now --header-timeout after a request's first byte
    (a new connection's start) the server closes them, with a 408 in OpenAI's shape where part of a request
    came; and two dozen of them waiting meanwhile keep no one else from being answered at once. A connection
    kept alive is not cut while idle between requests (the keep-alive timer rules there)."""
    client, http, _, _, _, _ = spec
    port = http.base_url.port

    def connect():
        return socket.create_connection(("127.0.0.1", port), timeout=HEADER_TIMEOUT + 15)

    health = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"

    def answered(s) -> bytes:                        # one whole answer to /health on a kept-alive connection
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        while len(body) < length:
            body += s.recv(65536)
        return head

    kept = connect()                                 # answered, then part of its next request's headers
    kept.sendall(health)
    assert answered(kept).startswith(b"HTTP/1.1 200")
    partial = [connect() for _ in range(16)]
    silent = [connect() for _ in range(8)]
    t0 = time.monotonic()
    for i, s in enumerate(partial + [kept]):
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" if i % 2 else b"GET /heal")
    assert [m.id for m in client.models.list().data] == [NAME]                # answered at once meanwhile
    assert time.monotonic() - t0 < HEADER_TIMEOUT
    r = client.completions.create(model=NAME, prompt="x", max_tokens=2)
    assert r.usage.completion_tokens == 2
    for s in partial + [kept] + silent:
        with s:
            answer, closed = _until_closed(s)
        assert HEADER_TIMEOUT - 0.2 <= closed - t0 < HEADER_TIMEOUT + 10, closed - t0
        if s in silent:
            assert answer == b"", answer                 # nothing came: closed without an answer
            continue
        status, _, rest = answer.partition(b"\r\n")
        headers, _, body = rest.partition(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 408") and b"connection: close" in headers.lower(), answer
        err = json.loads(body)["error"]
        assert err["code"] == "request_timeout" and "--header-timeout" in err["message"], err
    with connect() as idle:                          # idle between requests longer than the header limit: kept
        idle.sendall(health)
        assert answered(idle).startswith(b"HTTP/1.1 200")
        time.sleep(HEADER_TIMEOUT + 0.5)
        idle.sendall(health)
        assert answered(idle).startswith(b"HTTP/1.1 200")
    assert client.completions.create(model=NAME, prompt="x", max_tokens=2).usage.completion_tokens == 2



def test_max_requests_sheds_load_with_503_and_keeps_serving(model_dir, tmp_path):
    """``--max-requests 2`` with one request decoded at a time: a request for more generations than the
    limit (n=3), and requests beyond two in flight, get 503 server_overloaded with Retry-After; every one
    admitted is answered in full; once they are done the server takes requests again."""
    from concurrent.futures import ThreadPoolExecutor

    from helpers import serve_openai

    with serve_openai(model_dir, str(tmp_path), NAME, "k", "--max-requests", "2", "--max-batch", "1") as client:
        with pytest.raises(openai.APIStatusError) as err:
            client.completions.create(model=NAME, prompt="a", max_tokens=3, n=3)
        assert err.value.status_code == 503 and err.value.response.headers.get("retry-after") == "1"
        body = err.value.response.json()["error"]
        assert body["code"] == "server_overloaded" and "--max-requests" in body["message"]

        def one(i):
            try:
                r = client.completions.create(model=NAME, prompt=f"a{i}", max_tokens=40, temperature=0)
                return "ok", r.usage.completion_tokens
            except openai.APIStatusError as e:
                return e.status_code, e.response.json()["error"]["code"]

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(8)))
        done = [r for r in results if r[0] == "ok"]
        shed = [r for r in results if r[0] != "ok"]
        assert shed and all(r == (503, "server_overloaded") for r in shed), results
        assert done and all(0 < n <= 40 for _, n in done), results
        r = client.completions.create(model=NAME, prompt="again", max_tokens=5)      # all answered: room again
        assert r.choices[0].text is not None


def test_requests_cut_off_by_the_drain_get_503(spec):
    """Last: stops the module's server. SIGTERM with --shutdown-grace 0: the requests still in flight
    (one streaming, others waiting for the pool) are aborted and answered, a 503 in OpenAI's shape or
    an error event and [DONE] ending the stream; no bare 500 or stream cut short (uvicorn's cancel), no
    traceback, exit code 0."""
    _, http, tok, _, log, proc = spec
    body = {"model": NAME, "prompt": "z", "max_tokens": 60, "logit_bias": {str(tok.eos_id): -100}}
    whole = []

    def ask():
        whole.append(httpx.post(http.base_url.join("/v1/completions"), json=body, timeout=60))

    with http.stream("POST", "/v1/completions", json=dict(body, stream=True)) as stream:
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        threads = [threading.Thread(target=ask) for _ in range(6)]
        for t in threads:
            t.start()
        deadline = time.time() + 30
        while http.get("/health").json()["waiting"] < len(threads):    # all six in, before the listener closes
            assert time.time() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        events = [line[6:] for line in lines if line.startswith("data: ")]
    for t in threads:
        t.join(timeout=60)
    assert events[-1] == "[DONE]", events[-3:]
    last = json.loads(events[-2])
    if "error" in last:                             # cut off, else it had finished before the signal
        assert last["error"]["code"] == "shutting_down", last
    else:
        assert last["choices"][0]["finish_reason"] == "length", last
    codes = sorted(r.status_code for r in whole)
    assert len(codes) == 6 and set(codes) <= {200, 503} and 503 in codes, [r.text for r in whole]
    for r in whole:
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "shutting_down" and set(r.json()["error"]) == \
                {"message", "type", "param", "code"}, r.text
        else:
            assert r.json()["choices"][0]["finish_reason"] == "length", r.text
    assert proc.wait(timeout=30) == 0
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
