"""The long-context demo's report: figures and tables from the ``dsv3 eval`` results of
``scripts/long_context_demo.sh`` (``.json`` and ``.niah.json`` of each stage in STAGES, in one directory:
stage0 is the pre-trained model, stage0_copy the model after stage 0's copy and passkey training at the
original length, stage1/stage2 the YaRN stages), plus stage 0a's copy accuracy by step
(``stage0a_copy_accuracy.jsonl``, from ``benchmarks/induction_probe.py --measure``) when present.

Writes OUT/loss_by_position.png, OUT/passkey_heatmap.png, OUT/niah_heatmap.png (``dsv3.eval.plots``)
and OUT/summary.md / summary.json with the acceptance figures:

* loss beyond the original trained length vs its in-range value (positions [L0/2, L0)): within 10%
  after extension, rising well beyond before;
* passkey accuracy at 4× the original length: ≥ 90% after extension, near chance (1e-5) before.

    python benchmarks/long_context_report.py benchmarks/results/long_context
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys

from dsv3.eval.plots import draw

STAGES = ("stage0", "stage0_copy", "stage1", "stage2")


def load(out: str) -> list[dict]:
    results = []
    for name in STAGES:
        path = os.path.join(out, f"{name}.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            res = json.load(f)
        niah = os.path.join(out, f"{name}.niah.json")
        if os.path.exists(niah):
            with open(niah) as f:
                res["tasks"].update(json.load(f)["tasks"])
        res["stage"] = name
        results.append(res)
    return results


def main(out: str) -> None:
    import torch

    results = load(out)
    if not results:
        sys.exit(f"no stage*.json in {out}")
    figures = draw(results, out)
    rows, summary = [], {"date": datetime.date.today().isoformat(), "device": platform.processor() or platform.machine(),
                         "cpus": os.cpu_count(), "torch": torch.__version__, "models": []}
    for r in results:
        p, pk, nh = r["tasks"].get("ppl-by-position", {}), r["tasks"].get("passkey"), r["tasks"].get("niah")
        L0 = r["trained_length"]
        four = str(4 * L0)
        entry = {"stage": r["stage"], "label": r["label"], "trained_length": L0,
                 "rope_scaling": r["rope_scaling"], "in_range": p.get("in_range"), "beyond": p.get("beyond"),
                 "beyond_ratio": p.get("beyond_ratio"), "worst_bucket_ratio": p.get("worst_bucket_ratio"),
                 "passkey_by_length": pk["by_length"] if pk else None,
                 "passkey_at_4x": pk["by_length"].get(four) if pk else None,
                 "niah_by_length": nh["by_length"] if nh else None}
        summary["models"].append(entry)
        rows.append(entry)
    L = results[0]["tasks"].get("ppl-by-position", {}).get("length")
    lines = ["# Long context: YaRN extension stages at tiny scale", "",
             f"{summary['date']}, {summary['device']}, {summary['cpus']} CPUs, torch {summary['torch']}; "
             f"made by `scripts/long_context_demo.sh`.", "",
             f"| model | rope_scaling | loss [L0/2, L0) | loss [L0, {L}) | change | worst bucket beyond | "
             f"passkey at 4×L0 | passkey by length | NIAH by length |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in rows:
        rs = e["rope_scaling"]
        at4 = "–" if e["passkey_at_4x"] is None else f"{100 * e['passkey_at_4x']:.0f}%"
        fmt = lambda d: ", ".join(f"{k}: {100 * v:.0f}%" for k, v in d.items()) if d else "–"  # noqa: E731
        lines.append(
            f"| {e['label']} | {'yarn ×%g over %d' % (rs['factor'], rs['original_max_position_embeddings']) if rs else 'none'} "
            f"| {e['in_range']:.3f} | {e['beyond']:.3f} | {100 * (e['beyond_ratio'] - 1):+.1f}% "
            f"| {100 * (e['worst_bucket_ratio'] - 1):+.1f}% "
            f"| {at4} "
            f"| {fmt(e['passkey_by_length'])} | {fmt(e['niah_by_length'])} |")
    base, last = rows[0], rows[-1]
    if len(rows) > 1 and base["beyond_ratio"] is not None and last["beyond_ratio"] is not None:
        ok_loss = last["beyond_ratio"] <= 1.10 and last["worst_bucket_ratio"] <= 1.10
        ok_pk = last["passkey_at_4x"] is not None and last["passkey_at_4x"] >= 0.9
        summary["acceptance"] = {"loss_within_10pct": ok_loss, "passkey_4x_ge_90pct": ok_pk}
        lines += ["", "Acceptance (the last stage against the pre-trained model):", "",
                  f"- loss beyond the trained length within 10% of in range: {'holds' if ok_loss else 'missed'} "
                  f"({last['label']}: mean {100 * (last['beyond_ratio'] - 1):+.1f}%, worst bucket "
                  f"{100 * (last['worst_bucket_ratio'] - 1):+.1f}%; {base['label']}: mean "
                  f"{100 * (base['beyond_ratio'] - 1):+.1f}%, worst bucket {100 * (base['worst_bucket_ratio'] - 1):+.1f}%)",
                  f"- passkey at 4× the trained length ≥ 90%: {'holds' if ok_pk else 'missed'} ({last['label']}: "
                  f"{'–' if last['passkey_at_4x'] is None else '%.0f%%' % (100 * last['passkey_at_4x'])}; "
                  f"{base['label']}: {'–' if base['passkey_at_4x'] is None else '%.0f%%' % (100 * base['passkey_at_4x'])}, "
                  f"chance 0.001%)"]
    for r in results:
        g = r["tasks"].get("passkey")
        if not g:
            continue
        lines += ["", f"Passkey grid, {r['label']} (% of {g['samples']} keys per cell; rows: prompt length, "
                      f"columns: depth of the key):", "",
                  "| length | " + " | ".join(f"{d:g}" for d in g["depths"]) + " |",
                  "|---" * (len(g["depths"]) + 1) + "|"]
        for n, row in zip(g["lengths"], g["accuracy"]):
            lines.append(f"| {n} | " + " | ".join(f"{100 * a:.0f}" for a in row) + " |")
    copy = os.path.join(out, "stage0a_copy_accuracy.jsonl")
    if os.path.exists(copy):
        with open(copy) as f:
            recs = [json.loads(line) for line in f if line.strip()]
        summary["copy_accuracy"] = recs
        lines += ["", f"Copy accuracy during stage 0a (argmax on the repeated tokens of {recs[0]['documents']} held-out "
                      f"documents of {recs[0]['window']} tokens, span lengths 4 … {recs[0]['window'] // 2}):", "",
                  "| model | copy accuracy |", "|---|---|"]
        for rec in recs:
            lines.append(f"| {rec['model']} | {100 * rec['copy_accuracy']:.1f}% |")
    lines += ["", "Figures: " + ", ".join(os.path.basename(f) for f in figures)]
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "results", "long_context"))
