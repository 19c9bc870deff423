"""A rank killed while ``torchrun … dsv3 serve --ep 2`` serves: the survivors stop within seconds with
one line naming it (after serving the model's own greedy text), rank 0 answers what was in flight (a stream and a whole completion) and what comes
after with 503 in OpenAI's error shape, and torchrun exits nonzero — nothing hangs.

Driven with the official ``openai`` client against real ranks (torchrun, gloo)."""

import os
import random
import signal
import threading
import time

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from helpers import free_port, rank_pid, save_served_model, start_ep_serve, stop_ep_serve, wait_healthy  # noqa: E402

SEED = random.SystemRandom().randrange(1 << 30)
BOUND = 30.0                 # seconds the failure may take to reach every client and stop torchrun


def _in_flight(client, model, results):
    """A whole completion long enough to be running when the rank dies; its outcome lands in ``results``."""
    try:
        results["whole"] = client.completions.create(model=model, prompt="abc", max_tokens=400, temperature=0)
    except openai.OpenAIError as e:
        results["whole"] = e


def test_rank_killed_mid_stream(tmp_path):
    model_dir = save_served_model(tmp_path / "model", SEED, max_position_embeddings=512)
    port, log = free_port(), tmp_path / "serve.log"
    proc = start_ep_serve(model_dir, 2, port, log, "--max-batch", "4")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log, 120, "the ranks")
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        # first it serves: greedy completions on both ranks equal the model run in this process
        from dsv3.infer.generate import generate, load_model_dir

        model, tok = load_model_dir(model_dir, "cpu")
        prompts = ["def f(x):", "import os\n", "class A:", "for i in"]
        got = client.completions.create(model=model_dir, prompt=prompts, max_tokens=8, temperature=0)
        ref = [tok.decode(generate(model, tok.encode(p, add_bos=tok.add_bos_token), 8, temperature=0,
                                   eos_id=tok.stop_ids), skip_special_tokens=True) for p in prompts]
        assert [c.text for c in got.choices] == ref
        results: dict = {}
        whole = threading.Thread(target=_in_flight, args=(client, model_dir, results))
        whole.start()
        stream = client.completions.create(model=model_dir, prompt="xyz", max_tokens=400, temperature=0,
                                           stream=True)
        chunks = iter(stream)
        assert next(chunks).choices[0].text is not None                     # it is streaming
        deadline = time.time() + 30
        while httpx.get(url + "/health", timeout=5).json()["running"] < 2:  # both requests are running
            assert time.time() < deadline and "whole" not in results, results
            time.sleep(0.05)

        victim = rank_pid(proc.pid, 1)
        os.kill(victim, signal.SIGKILL)
        killed = time.time()

        with pytest.raises(openai.APIError) as streamed:                   # the stream: an error event, then closed
            for _ in chunks:
                assert time.time() - killed < BOUND, "the stream went on after its rank died"
        assert streamed.value.body["code"] == "engine_dead", streamed.value.body
        assert f"rank 1 (pid {victim}) exited" in streamed.value.message, streamed.value.message
        assert time.time() - killed < BOUND

        whole.join(BOUND)
        assert not whole.is_alive(), "the whole completion hangs"
        err = results["whole"]
        assert isinstance(err, openai.APIStatusError) and err.status_code == 503, err
        assert err.body["code"] == "engine_dead" and set(err.body) == {"message", "type", "param", "code"}

        # new work: 503 while the server listens (torchrun stops it at once: then the port is closed)
        try:
            client.completions.create(model=model_dir, prompt="late", max_tokens=2)
            raise AssertionError("a request after the failure was served")
        except openai.APIStatusError as e:
            assert e.status_code == 503 and e.body["code"] in ("engine_dead", "shutting_down"), e.body
        except openai.APIConnectionError:
            pass
        try:
            assert httpx.get(url + "/health", timeout=5).status_code == 503
        except httpx.TransportError:
            pass

        code = proc.wait(timeout=max(BOUND - (time.time() - killed), 1))
        assert code != 0
        assert time.time() - killed < BOUND
    finally:
        stop_ep_serve(proc, log, 40)
    text = log.read_text()
    lines = [ln for ln in text.splitlines() if ln.startswith("dsv3 serve: error:")]
    assert len(lines) == 1, text                                             # one line: rank 0's
    assert lines[0].startswith(f"dsv3 serve: error: rank 0: the expert-parallel group failed: rank 1 (pid {victim}) "
                               f"exited (") and lines[0].endswith("(answering 503 until stopped)"), lines
    # our ranks print no traceback; torchrun prints its own report of the killed rank (ChildFailedError)
    assert text.count("Traceback") == text.count("ChildFailedError:") <= 1, text


# --------------------------------------------------------------------------------- the pieces, in process
def test_the_line_names_exited_ranks_and_keeps_the_transports_words(tmp_path, monkeypatch):
    import socket
    import subprocess
    import sys

    from dsv3.infer.ep_failure import describe, exited_ranks, transport_words
    from dsv3.infer.worker import exit_status

    gloo = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
                        "[127.0.0.1]:63700: Connection reset by peer. This is typically caused by a remote worker "
                        "hanging or bugs in the application. Check the logs of the remote worker. GLHF!")
    assert transport_words(gloo) == "Read error [127.0.0.1]:63700: Connection reset by peer"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        while dead.poll() is None:          # poll() reaps it: the pid is gone …
            time.sleep(0.01)
        zombie = subprocess.Popen([sys.executable, "-c", "pass"])
        os.waitid(os.P_PID, zombie.pid, os.WEXITED | os.WNOWAIT)      # … this one exited, not reaped
        host = socket.gethostname()
        peers = [(host, os.getpid()), (host, live.pid), (host, dead.pid), (host, zombie.pid),
                 ("another-host", dead.pid)]
        assert exited_ranks(peers, wait=0) == [2, 3]
        line = describe(gloo, peers)
        assert line == (f"the expert-parallel group failed: ranks 2 (pid {dead.pid}), 3 (pid {zombie.pid}) exited "
                        f"(Read error [127.0.0.1]:63700: Connection reset by peer)")
        zombie.wait()
    finally:
        live.kill()
        live.wait()
    assert exit_status(-9) == "killed by SIGKILL" and exit_status(1) == "code 1"
    monkeypatch.setenv("DSV3_CRASH_DIR", str(tmp_path))             # no rank gone: the traceback goes to a file
    try:
        raise ValueError("a bug of this rank")
    except ValueError as e:
        line = describe(e, [(socket.gethostname(), os.getpid())])
    path = line.split("; traceback in ")[1]
    assert line.startswith("the expert-parallel group failed: ValueError: a bug of this rank; traceback in ")
    assert "a bug of this rank" in open(path).read() and path.startswith(str(tmp_path))


def test_a_rank_stopped_while_the_group_forms_exits_at_once(tmp_path):
    """SIGTERM (torchrun passing on a Ctrl-C, or stopping the group) reaches rank 1 while the group still
    forms — here it waits for a rank 0 whose store accepts the connection and never answers: it exits at
    once, quietly (nothing runs yet, nothing to drain). It used to ignore SIGTERM from its first line, so
    torchrun waited out its --shutdown-timeout (30 s) and then SIGKILLed it."""
    import socket
    import subprocess
    import sys

    from helpers import cli_env

    model_dir = save_served_model(tmp_path / "model", SEED)
    ep = dict(size=2, gpus_per_node=2, two_hop=False, fp8_dispatch=False, shared_as_routed=False, timeout=60.0,
              redundant_experts=0, rebalance_interval=None, rebalance_window=128, tbo=False, trace_dir=None)
    spec = dict(model_dir=model_dir, device="cpu", fp8="auto", threads=1, prefix_cache=None, engine={}, ep=ep)
    with socket.socket() as store:                      # rank 0's store: takes the connection, never answers
        store.bind(("127.0.0.1", 0))
        store.listen()
        env = dict(cli_env(), RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.getsockname()[1]))
        proc = subprocess.Popen([sys.executable, "-c", "import sys; from dsv3.infer.ep_engine import serve_follower; "
                                 f"sys.exit(serve_follower({spec!r}))"], env=env, stderr=subprocess.PIPE, text=True)
        try:
            store.settimeout(60)
            conn, _ = store.accept()                    # rank 1 is inside init_process_group
            with conn:
                time.sleep(0.5)
                os.kill(proc.pid, signal.SIGTERM)
                t0 = time.time()
                code = proc.wait(timeout=10)
                assert time.time() - t0 < 5
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert code == -signal.SIGTERM, code
    assert "Traceback" not in proc.stderr.read()


def test_an_engine_whose_server_is_gone_before_it_is_ready_exits_quietly(tmp_path):
    """Ctrl-C / SIGTERM while the model loads stops the server's process at once; its engine process (under
    --ep: rank 0 of the group, the others waiting for it) finishes loading, or fails to, and finds no one
    to tell. It exits quietly (code 0); it used to end with a BrokenPipeError traceback in the log."""
    import subprocess
    import sys

    from helpers import cli_env

    model_dir = save_served_model(tmp_path / "model", SEED)
    script = f"""
import multiprocessing as mp
from dsv3.infer.worker import _engine_process
for model_dir in ({str(tmp_path / "missing")!r}, {model_dir!r}):          # fails to start; starts
    server, engine = mp.Pipe()
    server.close()                                                        # the server has gone
    _engine_process(engine, dict(model_dir=model_dir, device="cpu", fp8="auto", threads=1, prefix_cache=None,
                                 engine=dict(max_batch=2), ep=None))
print("returned")
"""
    done = subprocess.run([sys.executable, "-c", script], env=cli_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "returned", done.stderr
    assert "Traceback" not in done.stderr, done.stderr
