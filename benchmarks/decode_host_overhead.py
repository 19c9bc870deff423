"""Host overhead of one engine decode step: aten ops dispatched (and of those, the ones that are not mere views: on a GPU each launches a kernel), host syncs, ms (``small`` preset, CPU).

A decode step that is bound by the host (Python, op dispatch, kernel launches, waits for the device)
leaves a GPU idle, whatever its speed. This counts, for one decode step of
:class:`dsv3.infer.engine.Engine` over the ``small`` preset (random init, seed 0, fp32, greedy):

* **aten ops**: every aten op the step dispatches (a ``TorchDispatchMode`` counter: the ops the
  Python layer asks for, not the kernels they are implemented with). On a GPU each is at least one
  kernel launch or a host-side tensor operation.
* **syncs**: calls that make the host wait for the device (on a GPU): ``.item()``/``int()``/
  ``float()``/``bool()`` of a tensor (``aten._local_scalar_dense``), ``.tolist()``/``.numpy()``,
  ops whose output size depends on the data (``nonzero``, ``masked_select``, boolean-mask indexing,
  ``bincount``, ``unique``, ``repeat_interleave`` without ``output_size``) and copies to the host.
* **uploads**: tensors made from Python data (``torch.tensor(list)``: ``aten.lift_fresh``) — on a
  GPU, a copy from pageable host memory that blocks the host until it is done.
* **ms**: the median wall time of ``--steps`` decode steps (one torch thread; the machine is shared,
  so this is noisy — the counts are not).

Batches 1 and 8: B requests with 32-token prompts are prefilled, 3 warm-up steps run, then the counted
step and the timed steps. A digest of every greedy token is recorded (runs on different code must agree).

``--baseline REV`` also runs the engine and model of git revision REV (its ``src/dsv3`` extracted to
a temporary package, the same weights), so before/after figures come from one process and one load.

    python benchmarks/decode_host_overhead.py [--steps 20] [--baseline REV] [--out NAME]

Writes benchmarks/results/NAME.{json,md} (default decode_host_overhead). The md keeps a section
``## Before`` (copied from the previous md when present; see ``--keep-before``).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import hashlib
import json
import os
import statistics
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from _baseline import baseline  # noqa: E402 (benchmarks/ is the script's directory)
import dsv3.infer.engine
import dsv3.infer.sampling
from dsv3.config import ModelConfig
from dsv3.model.transformer import Transformer

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "results"
PROMPT_LEN = 32
WARMUP = 3

aten = torch.ops.aten
# ops that read device data on the host (or whose output size depends on device data)
SYNC_OPS = {aten._local_scalar_dense.default, aten.item.default, aten.nonzero.default, aten.masked_select.default,
            aten.bincount.default, aten._unique2.default, aten.unique_dim.default,
            aten.unique_consecutive.default, aten.repeat_interleave.Tensor}
UPLOAD_OPS = {aten.lift_fresh.default}
# ops that only make a new view / read metadata: no kernel on a GPU (the rest each launch at least one)
VIEW_OPS = {"view", "_unsafe_view", "reshape", "slice", "select", "transpose", "t", "permute", "unsqueeze", "squeeze",
            "flatten", "split", "split_with_sizes", "view_as_complex", "view_as_real", "expand", "alias", "detach",
            "detach_", "as_strided", "unbind", "resolve_conj", "resolve_neg", "lift_fresh", "item",
            "_local_scalar_dense"}


def _is_sync(func, args, kwargs) -> bool:
    if func in SYNC_OPS:
        return func is not aten.repeat_interleave.Tensor or kwargs.get("output_size") is None
    if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []))
    if func in (aten._to_copy.default, aten.copy_.default):
        src = args[1] if func is aten.copy_.default else args[0]
        dst_dev = args[0].device if func is aten.copy_.default else kwargs.get("device")
        return (isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst_dev is not None
                and torch.device(dst_dev).type == "cpu")
    return False


class StepCounter(TorchDispatchMode):
    """Counts aten ops, syncs and uploads while active (``.tolist()``/``.numpy()`` do not dispatch:
    they are counted by wrapping the Tensor methods for the duration)."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.syncs: collections.Counter = collections.Counter()
        self.uploads = 0
        self._saved = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops[str(func.overloadpacket.__name__)] += 1
        if _is_sync(func, args, kwargs):
            self.syncs[str(func.overloadpacket.__name__)] += 1
        if func in UPLOAD_OPS:
            self.uploads += 1
        return func(*args, **kwargs)

    def __enter__(self):
        for name in ("tolist", "numpy"):
            orig = getattr(torch.Tensor, name)
            self._saved[name] = orig

            def wrapped(t, *a, _orig=orig, _name=name, **k):
                self.syncs[_name] += 1
                return _orig(t, *a, **k)
            setattr(torch.Tensor, name, wrapped)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, orig in self._saved.items():
            setattr(torch.Tensor, name, orig)
        return super().__exit__(*exc)

    def summary(self) -> dict:
        return {"aten_ops": sum(self.ops.values()),
                "non_view_ops": sum(n for op, n in self.ops.items() if op not in VIEW_OPS), "syncs": sum(self.syncs.values()), "uploads": self.uploads,
                "sync_kinds": dict(self.syncs.most_common()), "top_ops": dict(self.ops.most_common(12))}


def current(model) -> SimpleNamespace:
    return SimpleNamespace(Engine=dsv3.infer.engine.Engine, Params=dsv3.infer.sampling.SamplingParams, model=model)


class Decode:
    """B greedy requests decoding on one engine."""

    def __init__(self, code, batch: int, steps: int):
        self.eng = code.Engine(code.model, max_batch=batch, max_len=512, cache_memory=256 << 20)
        vocab = code.model.cfg.vocab_size
        g = torch.Generator().manual_seed(batch)
        self.reqs = [self.eng.submit(p, max_new_tokens=steps + WARMUP + 3, params=code.Params(0.0))
                     for p in torch.randint(3, vocab, (batch, PROMPT_LEN), generator=g).tolist()]
        while any(not r.output for r in self.reqs):
            self.eng.step()
        for _ in range(WARMUP):
            self.eng.step()

    def counted_step(self) -> dict:
        with StepCounter() as c:
            self.eng.step()
        out = c.summary()
        dev = self.eng.device
        if dev.type == "cuda":                  # the device's own count: CUDA's sync debug mode warnings
            import warnings
            torch.cuda.synchronize(dev)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    self.eng.step()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            out["cuda_syncs"] = sum("synchroniz" in str(w.message) for w in caught)
        return out

    def timed_step(self) -> float:
        dev = self.eng.device
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        self.eng.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0

    def digest(self) -> str:
        self.eng.run()
        return hashlib.sha256(json.dumps([r.output for r in self.reqs]).encode()).hexdigest()[:16]


def git(*args) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def table(res: dict, codes: list[str]) -> list[str]:
    cuda = any("cuda_syncs" in r for per in res.values() for r in per.values())
    lines = ["| batch | code | aten ops / step | of which not views | syncs / step "
             + ("| syncs CUDA saw " if cuda else "") + "| uploads / step | ms / step (median) | sync kinds |",
             "|---:|---|---:|---:|---:|" + ("---:|" if cuda else "") + "---:|---:|---|"]
    for b, per in res.items():
        for name in codes:
            r = per[name]
            kinds = ", ".join(f"{k} {v}" for k, v in r["sync_kinds"].items()) or "—"
            lines.append(f"| {b} | {name} | {r['aten_ops']} | {r['non_view_ops']} | {r['syncs']} | "
                         + (f"{r.get('cuda_syncs', '')} | " if cuda else "")
                         + f"{r['uploads']} | {r['ms']:.1f} | {kinds} |")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--baseline", default=None, help="git revision to run alongside, in the same process "
                    "(or a directory holding its dsv3 package)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda: there the steps are timed with a "
                    "device sync around each, and CUDA's sync debug mode counts the syncs too")
    ap.add_argument("--dtype", default="float32", help="model dtype (float32; bfloat16 on a GPU)")
    ap.add_argument("--out", default="decode_host_overhead")
    ap.add_argument("--keep-before", action=argparse.BooleanOptionalAction, default=True,
                    help="carry the '## Before' section of the existing md into the new one")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig.preset("small")
    if args.device != "cpu":                    # as benchmarks/gpu_suite.py serves it: no MTP module
        cfg = cfg.replace(num_nextn_predict_layers=0)
    model = Transformer(cfg).eval().to(device=args.device, dtype=getattr(torch, args.dtype))
    codes = {"current": current(model)}
    if args.baseline:
        codes["baseline"] = baseline(args.baseline, model)
    for moe in model.moe_layers():       # the current code's MoE as a GPU runs it ("auto" on a CPU takes
        moe.experts.backend = "grouped_mm"   # the per-expert loop for a single request's few rows)
    load_before = os.getloadavg()
    res: dict = {}
    for b in args.batches:
        runs = {name: Decode(code, b, args.steps) for name, code in codes.items()}
        per = {name: run.counted_step() for name, run in runs.items()}
        times = {name: [] for name in runs}
        for i in range(args.steps):                     # alternate: both see the same load, and each goes
            for name in (list(runs) if i % 2 == 0 else list(runs)[::-1]):   # first (cold caches) half the time
                times[name].append(runs[name].timed_step())
        for name, run in runs.items():
            per[name]["ms"] = statistics.median(times[name]) * 1e3
            per[name]["ms_all"] = [round(t * 1e3, 2) for t in times[name]]
            per[name]["greedy_digest"] = run.digest()
        res[b] = per
        print(f"batch {b}: " + "; ".join(f"{n} {p['aten_ops']} ops ({p['non_view_ops']} not views), {p['syncs']} syncs"
                                         f" (CUDA: {p.get('cuda_syncs', '-')}), {p['uploads']} uploads, "
                                         f"{p['ms']:.1f} ms" for n, p in per.items()), flush=True)
    load_after = os.getloadavg()
    commit = git("rev-parse", "--short", "HEAD")
    dirty = bool(git("status", "--porcelain", "--", "../src/dsv3"))
    result = {"when": datetime.datetime.now().isoformat(timespec="seconds"), "commit": commit, "src_dirty": dirty,
              "baseline": args.baseline, "model": f"small preset, random init (seed 0), {args.dtype}, {args.device}, greedy",
              "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "threads": args.threads, "steps": args.steps, "prompt_len": PROMPT_LEN, "torch": torch.__version__,
              "load_average_before": load_before, "load_average_after": load_after, "results": res}
    OUT.mkdir(exist_ok=True)
    (OUT / f"{args.out}.json").write_text(json.dumps(result, indent=1))
    md = OUT / f"{args.out}.md"
    before = ""
    if args.keep_before and md.exists():
        text = md.read_text()
        if "## Before" in text:
            before = text[text.index("## Before"):].rstrip() + "\n"
        elif "## This run" in text:            # the first run becomes the "before" section
            before = "## Before\n" + text[text.index("## This run") + len("## This run"):].rstrip() + "\n"
    names = list(codes)
    cmd = f"python benchmarks/decode_host_overhead.py --steps {args.steps}"
    cmd += f" --device {args.device} --dtype {args.dtype}" if args.device != "cpu" else ""
    cmd += f" --baseline {args.baseline}" if args.baseline else ""
    digests_equal = {b: len({p["greedy_digest"] for p in per.values()}) == 1 for b, per in res.items()}
    lines = [
        f"# Host overhead of one decode step (engine, `small` preset, {result['device_name']}, {args.dtype})", "",
        "Counted with a `TorchDispatchMode` over one engine decode step (see the script's docstring): aten ops "
        "dispatched (and of those, the ones that are not mere views: on a GPU each launches a kernel), host syncs (device→host reads: `.item()`/`int()`/`bool()` of tensors, `.tolist()`, "
        "`nonzero`, boolean-mask indexing, `bincount`, …: each would stall the host on a GPU) and uploads "
        "(`torch.tensor(list)`: a blocking host→device copy on a GPU). ms: median wall time of the timed steps, "
        "1 torch thread on a shared 2-core machine (noisy; the counts are exact).", "",
        "## This run", "",
        f"{result['when']} · commit {commit}{' + uncommitted src changes' if dirty else ''} · `{cmd}` · "
        f"torch {torch.__version__} · load average {load_before[0]:.2f}/{load_after[0]:.2f} (before/after)", "",
        *table(res, names), "",
        "Greedy digests: " + "; ".join(f"batch {b}: " + ", ".join(f"{n} {p['greedy_digest']}" for n, p in per.items())
                                     + (" (equal)" if len(per) > 1 and digests_equal[b] else "")
                                     for b, per in res.items()), "",
    ]
    if before:
        lines += [before]
    md.write_text("\n".join(lines))
    print(f"wrote {md}")


if __name__ == "__main__":
    main()
