"""The engine in its own process (dsv3.infer.worker.EngineWorker): tokens equal single-request
generation, abort, validation in the caller, a failed start as one clear error, and a dead engine
process reported (alive False) with its requests finished, never left hanging."""

import os
import signal
import threading
import time

import pytest

from dsv3.infer.engine import ContextOverflow
from dsv3.infer.generate import generate, load_model_dir
from dsv3.infer.sampling import SamplingParams
from dsv3.infer.worker import EngineWorker


def _wait(pred, timeout=60):
    deadline = time.time() + timeout
    while not pred():
        assert time.time() < deadline
        time.sleep(0.01)


@pytest.fixture(scope="module")
def worker(model_dir):
    w = EngineWorker(model_dir, device="cpu", threads=1, max_batch=3, block_size=16)
    yield w
    w.close(grace=0)


def test_tokens_equal_generate_and_callbacks(worker, model_dir):
    model, _ = load_model_dir(model_dir, "cpu")
    prompts = [[5, 6, 7, 8], list(range(10, 40)), [9]]
    seen, ended = [], threading.Event()
    reqs = [worker.submit(p, 12, SamplingParams(0.0), logprobs=2,
                          on_token=lambda r: seen.append(len(r.output)), on_done=lambda r: ended.set())
            for p in prompts]
    _wait(lambda: all(r.done for r in reqs))
    for r, p in zip(reqs, prompts):
        assert r.finish_reason == "length" and r.output == generate(model, p, 12, temperature=0)
        assert len(r.output_logprobs) == 12 and r.output_logprobs[0].token == r.output[0]
    assert ended.is_set() and seen and max(seen) == 12
    sampled = [worker.submit([5, 6, 7], 10, SamplingParams(0.9, top_p=0.95), seed=s) for s in (1, 1, 2)]
    _wait(lambda: all(r.done for r in sampled))
    assert sampled[0].output == sampled[1].output == generate(model, [5, 6, 7], 10, 0.9, top_p=0.95, seed=1)
    assert worker.stats()["steps"] > 0 and worker.stats()["alive"]


def test_abort_and_validation(worker):
    r = worker.submit([5, 6, 7], worker.max_len - 3, SamplingParams(0.0))
    _wait(lambda: len(r.output) >= 2)
    worker.abort(r)
    _wait(lambda: r.done)
    assert r.finish_reason == "abort" and len(r.output) < worker.max_len - 3
    with pytest.raises(ContextOverflow):
        worker.submit([5] * 10, worker.max_len)
    with pytest.raises(ValueError, match="token ids"):
        worker.submit([worker.vocab_size], 2)


def test_a_bad_start_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        EngineWorker(str(tmp_path / "missing"), device="cpu")


def test_a_dead_engine_process_is_reported(model_dir):
    w = EngineWorker(model_dir, device="cpu", threads=1, max_batch=2)
    try:
        r = w.submit([5, 6, 7], w.max_len - 3, SamplingParams(0.0))
        _wait(lambda: len(r.output) >= 1)
        os.kill(w.pid, signal.SIGKILL)
        _wait(lambda: r.done, 30)
        assert r.finish_reason == "error" and "exited" in r.error
        assert not w.alive and "exited" in w.error
        with pytest.raises(RuntimeError, match="stopped"):
            w.submit([5], 2)
    finally:
        w.close(grace=0)
