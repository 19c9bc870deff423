"""dsv3 grpo against TRL's GRPOTrainer, side by side (issue #15's peer benchmark).

Both train the same exported model (the R1 demo's cold-start SFT output, HF layout) on the same task
prompts (the built-in addition task, rendered with the model's chat template — TRL gets the rendered text,
and the script checks that TRL's tokenizer turns it into the very token ids dsv3 feeds its engine), with the
same rewards (dsv3's ``math`` and ``format`` functions, imported into the TRL run), group size, prompts per
step, learning rate (constant, no warm-up), steps, AdamW (β = 0.9, 0.95, ε = 1e-8, no weight decay,
gradient norm clipped at 1), loss type (``dapo``: every completion token of the batch weighted alike),
clip ε = 0.2, one optimizer step per batch of samples (μ = 1), KL β = 0.04 to the frozen starting model
(TRL reloads it from the path; dsv3 keeps the model it loaded), no gradient checkpointing (TRL's default is
on), no ``e_score_correction_bias`` update (TRL never updates it; ``--bias-update-speed 0`` on dsv3),
the R1 demo's sampling temperature (0.6; dsv3 takes the ratio and KL on the raw policy's log-probabilities,
TRL on the tempered ones), no top-k/top-p, fp32 on the CPU (``use_cpu=True, bf16=False``), one intra-op
thread.

Two measurements:

1. **Learning** — ``--steps`` steps on the task as it is (completions end at end-of-sentence, at most
   ``--max-new-tokens``): reward and accuracy of the samples at each step, both on one plot, and the greedy
   held-out accuracy of both final models, scored by the same evaluator (``dsv3 sample``'s) with a 95%
   Wilson interval.
2. **Time per GRPO step** at completion lengths ``--lengths`` (default 128 and 256): every completion is
   exactly that long (dsv3 ``--ignore-eos``; TRL ``min_new_tokens`` = ``max_completion_length``), the
   median wall time of ``--timing-steps`` steps after a first, untimed one (sampling, rewards, reference
   forward, the update: everything a step does), and the ratio TRL / dsv3.

TRL runs in its own virtual environment (never the project's): ``--setup`` creates it as
``python3 -m venv benchmarks/work/trl-venv``, ``pip install torch==2.13.0`` (the CPU wheel on local disk)
and ``pip install trl==1.16.0`` (which brings its transformers). This file is also the TRL-side worker
(``--worker``, run with that venv's Python); no TRL code is copied here, only its public API is used.

    python benchmarks/grpo_vs_trl.py --model runs/r1/sft/final --task runs/r1/task    # after scripts/r1_demo.sh

Writes benchmarks/results/grpo_vs_trl.{json,md,png} (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_VENV = os.path.join(ROOT, "benchmarks", "work", "trl-venv")
TRL_VERSION = "1.16.0"
TORCH_VERSION = "2.13.0"


def fail(msg: str) -> None:
    print(f"grpo_vs_trl: error: {msg}", file=sys.stderr)
    sys.exit(2)


# ============================================================================================ TRL worker
def worker(a) -> None:
    """Runs under the TRL venv: GRPOTrainer on the prepared prompts; per-step records to ``a.log``."""
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, os.path.join(ROOT, "src"))
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from dsv3.posttrain.rewards import format_reward, math_reward     # the very functions dsv3 grpo scores with

    with open(a.prompts_json) as f:
        prep = json.load(f)
    tok = AutoTokenizer.from_pretrained(a.model)
    texts = []
    for r in prep:                      # TRL tokenizes plain-text prompts with the tokenizer's defaults
        text = r["text"]
        if tok(text)["input_ids"] != r["ids"] and text.startswith(tok.bos_token or "\0"):
            text = text[len(tok.bos_token):]          # the tokenizer adds the BOS itself
        if tok(text)["input_ids"] != r["ids"]:
            raise SystemExit(f"TRL's tokenizer does not give dsv3's prompt ids for {r['text']!r}")
        texts.append(text)
    ds = Dataset.from_list([{"prompt": t, "answer": r["answer"]} for t, r in zip(texts, prep)])

    records: list[dict] = []
    pending: dict = {}

    def math(prompts, completions, answer, **_):
        v = [math_reward(c, x) for c, x in zip(completions, answer)]
        pending["math"] = v
        pending["length"] = None
        return v

    def format(prompts, completions, completion_ids=None, **_):      # noqa: A001 (the reward's name in TRL's logs)
        v = [format_reward(c) for c in completions]
        pending["format"] = v
        if completion_ids is not None:
            pending["length"] = sum(len(c) for c in completion_ids) / len(completion_ids)
        return v

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            m, fm = pending.get("math", []), pending.get("format", [])
            rec = {"step": state.global_step, "step_seconds": now - self.t,
                   "reward": (sum(m) + sum(fm)) / max(len(m), 1), "accuracy": sum(m) / max(len(m), 1),
                   "reward_math": sum(m) / max(len(m), 1), "reward_format": sum(fm) / max(len(fm), 1),
                   "response_length": pending.get("length")}
            records.append(rec)
            self.t = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            if records and logs:
                for k in ("kl", "clip_ratio/region_mean", "completions/mean_length", "loss"):
                    if k in logs:
                        records[-1]["trl_" + k.replace("/", "_")] = logs[k]

    fixed = a.fixed_length
    cfg = GRPOConfig(
        output_dir=a.out, max_steps=a.steps, num_generations=a.group,
        per_device_train_batch_size=a.group * a.prompts_per_step, gradient_accumulation_steps=1,
        learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0,
        beta=0.04, epsilon=0.2, num_iterations=1, loss_type="dapo", scale_rewards="group",
        temperature=a.temperature, top_p=1.0, top_k=0, max_completion_length=a.max_new_tokens,
        generation_kwargs={"min_new_tokens": a.max_new_tokens} if fixed else None,
        gradient_checkpointing=False, use_cpu=True, bf16=False, report_to=[], logging_steps=1,
        save_strategy="no", seed=a.seed, data_seed=a.seed, disable_tqdm=True, dataloader_num_workers=0,
        model_init_kwargs={"dtype": torch.float32})
    trainer = GRPOTrainer(model=a.model, reward_funcs=[math, format], args=cfg, train_dataset=ds,
                          processing_class=tok, callbacks=[Clock()])
    trainer.train()
    if a.save:
        trainer.save_model(a.save)
    with open(a.log, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


# ========================================================================================= orchestrator
def run(cmd: list[str], env: dict, what: str, log: str | None = None) -> float:
    t0 = time.perf_counter()
    out = open(log, "w") if log else subprocess.DEVNULL
    try:
        p = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if log else None)
    finally:
        if log:
            out.close()
    if p.returncode != 0:
        tail = ""
        if log and os.path.exists(log):
            with open(log) as f:
                tail = "".join(f.readlines()[-15:])
        raise SystemExit(f"grpo_vs_trl: {what} failed (exit {p.returncode})\n{tail}")
    return time.perf_counter() - t0


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(x) for x in f if x.strip()]


def setup_venv(venv: str) -> None:
    if not os.path.exists(os.path.join(venv, "bin", "python")):
        subprocess.run(["python3", "-m", "venv", venv], check=True)
    pip = [os.path.join(venv, "bin", "pip"), "install", "-q"]
    subprocess.run(pip + [f"torch=={TORCH_VERSION}"], check=True)
    subprocess.run(pip + [f"trl=={TRL_VERSION}"], check=True)


def prepare_prompts(model: str, path: str, limit: int, out: str) -> list[dict]:
    """The prompt records rendered with dsv3's chat template: text, token ids, answer."""
    from dsv3.posttrain.chat import read_prompt_file
    from dsv3.posttrain.common import open_model_dir

    _, tok, template = open_model_dir(model)
    recs = read_prompt_file(path)[:limit or None]
    prep = []
    for r in recs:
        text = template.render(r["messages"], add_generation_prompt=True)
        prep.append({"text": text, "ids": tok.encode(text), "answer": str(r.get("answer"))})
    with open(out, "w") as f:
        json.dump(prep, f)
    return prep


def heldout_accuracy(model: str, heldout: str, n: int, max_new: int, env: dict) -> dict:
    cmd = [os.path.join(ROOT, ".venv", "bin", "dsv3"), "sample", "--model", model, "--prompts", heldout, "--n", "1",
           "--temperature", "0", "--keep", "none", "--max-new-tokens", str(max_new), "--limit", str(n), "--json"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"grpo_vs_trl: evaluating {model} failed: {p.stderr.strip()[-500:]}")
    r = json.loads(p.stdout.strip().splitlines()[-1])
    return {k: r[k] for k in ("accuracy", "correct", "total", "ci95", "mean_length")}


def complete_export(src: str, dst: str) -> None:
    """Give TRL's saved model dsv3's config, tokenizer files and chat template (the weights are TRL's)."""
    import shutil

    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if os.path.exists(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))


def dsv3_grpo(a, env, out: str, steps: int, max_new: int, fixed: bool, log: str) -> list[dict]:
    cmd = [os.path.join(ROOT, ".venv", "bin", "dsv3"), "grpo", "--model", a.model, "--prompts", a.prompts_file,
           "--reward", "math,format", "--group", str(a.group), "--prompts-per-step", str(a.prompts_per_step),
           "--steps", str(steps), "--lr", str(a.lr), "--warmup", "0", "--weight-decay", "0", "--clip", "0.2",
           "--kl", "0.04", "--updates", "1", "--loss-type", "dapo", "--bias-update-speed", "0",
           "--temperature", str(a.temperature), "--max-new-tokens", str(max_new), "--seed", str(a.seed),
           "--save-every", "0", "--out", out, "--overwrite", "--no-progress", "--no-plots"]
    cmd += ["--ignore-eos"] if fixed else []
    run(cmd, env, f"dsv3 grpo ({out})", log)
    return read_jsonl(os.path.join(out, "metrics.jsonl"))


def trl_grpo(a, env, out: str, steps: int, max_new: int, fixed: bool, log: str, save: str | None) -> list[dict]:
    os.makedirs(out, exist_ok=True)
    cmd = [a.trl_python, os.path.abspath(__file__), "--worker", "--model", a.model, "--prompts-json", a.prompts_json,
           "--group", str(a.group), "--prompts-per-step", str(a.prompts_per_step), "--steps", str(steps),
           "--lr", str(a.lr), "--max-new-tokens", str(max_new), "--seed", str(a.seed), "--out", out,
           "--temperature", str(a.temperature),
           "--log", os.path.join(out, "steps.jsonl")] + (["--fixed-length"] if fixed else []) + \
          (["--save", save] if save else [])
    run(cmd, env, f"TRL GRPOTrainer ({out})", log)
    return read_jsonl(os.path.join(out, "steps.jsonl"))


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = res["learning"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    def smooth(v, k=5):
        return [sum(v[max(0, i - k + 1):i + 1]) / len(v[max(0, i - k + 1):i + 1]) for i in range(len(v))]

    for name, color in (("dsv3", "#4c72b0"), ("trl", "#dd8452")):
        rows = L[name]["steps"]
        x = [r["step"] for r in rows]
        for ax, key, what in ((axes[0], "reward", "reward (math + format)"), (axes[1], "accuracy", "accuracy")):
            v = [r[key] for r in rows]
            ax.plot(x, v, color=color, alpha=0.3, lw=0.8)
            ax.plot(x, smooth(v), color=color, lw=2, label=f"{name}: {what}, mean of 5 steps")
    axes[0].set_title("reward per step (samples)")
    axes[1].set_title("accuracy of the samples per step")
    for ax in axes[:2]:
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    names = ["start (SFT)", "dsv3 grpo", "TRL GRPOTrainer"]
    accs = [L["heldout_start"], L["dsv3"]["heldout"], L["trl"]["heldout"]]
    lo = [r["accuracy"] - r["ci95"][0] for r in accs]
    hi = [r["ci95"][1] - r["accuracy"] for r in accs]
    axes[2].bar(range(3), [r["accuracy"] for r in accs], yerr=[lo, hi], capsize=6, color=["#999", "#4c72b0", "#dd8452"])
    axes[2].set_xticks(range(3), names)
    for i, r in enumerate(accs):
        axes[2].text(i, r["ci95"][1] + 0.01, f"{r['accuracy']:.1%}\n({r['correct']}/{r['total']})", ha="center",
                     fontsize=8)
    axes[2].set_ylim(0, min(1.15, max(r["ci95"][1] for r in accs) + 0.15))
    axes[2].set_title("held-out accuracy after the run (greedy, 95% CI)")
    t = ", ".join(f"L={x['length']}: TRL/dsv3 = {x['ratio']:.2f}x" for x in res["timing"])
    fig.suptitle(f"GRPO, dsv3 vs TRL {res['versions'].get('trl', '')}: same model, task, rewards, settings — "
                 f"time per step {t}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def orchestrate(a) -> None:
    for flag, path in (("--model", a.model), ("--task", a.task)):
        if not os.path.isdir(path):
            fail(f"{flag} {path}: directory not found")
    if not os.path.exists(os.path.join(a.model, "config.json")):
        fail(f"--model {a.model}: no config.json (an HF-layout export, e.g. runs/r1/sft/final)")
    a.prompts_file = os.path.join(a.task, "train.jsonl")
    heldout = os.path.join(a.task, "heldout.jsonl")
    for p in (a.prompts_file, heldout):
        if not os.path.exists(p):
            fail(f"--task {a.task}: {os.path.basename(p)} missing (write the task with dsv3 r1-task)")
    try:
        lengths = [int(x) for x in a.lengths.split(",") if x.strip()]
    except ValueError:
        fail(f"--lengths {a.lengths}: comma-separated integers expected")
    if not lengths or min(lengths) < 1:
        fail(f"--lengths {a.lengths}: positive lengths expected")
    for flag in ("steps", "group", "prompts_per_step", "timing_steps", "heldout"):
        if getattr(a, flag) < (2 if flag == "group" else 1):
            fail(f"--{flag.replace('_', '-')} {getattr(a, flag)}: too small")
    if a.setup:
        setup_venv(a.venv)
    a.trl_python = os.path.join(a.venv, "bin", "python")
    if not os.path.exists(a.trl_python):
        fail(f"--venv {a.venv}: no TRL virtual environment there (run with --setup to create it)")
    work = os.path.abspath(a.work)
    os.makedirs(work, exist_ok=True)
    os.makedirs(a.out, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    a.prompts_json = os.path.join(work, "prompts.json")
    prepare_prompts(a.model, a.prompts_file, 0, a.prompts_json)
    vers = subprocess.run([a.trl_python, "-c", "import trl, transformers, torch; print(trl.__version__, "
                           "transformers.__version__, torch.__version__)"], capture_output=True, text=True, env=env)
    if vers.returncode != 0:
        fail(f"--venv {a.venv}: trl does not import there ({vers.stderr.strip()[-200:]}); rerun with --setup")
    trl_v, tf_v, torch_v = vers.stdout.split()
    import torch

    res = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(), "omp_threads": 1,
           "versions": {"trl": trl_v, "transformers": tf_v, "torch_trl_venv": torch_v, "torch_dsv3": torch.__version__},
           "model": os.path.abspath(a.model), "task": os.path.abspath(a.task),
           "settings": {"group": a.group, "prompts_per_step": a.prompts_per_step, "samples_per_step":
                        a.group * a.prompts_per_step, "lr": a.lr, "lr_schedule": "constant", "beta_kl": 0.04,
                        "clip": 0.2, "updates_per_batch": 1, "loss_type": "dapo", "adam": [0.9, 0.95, 1e-8],
                        "weight_decay": 0.0, "max_grad_norm": 1.0, "temperature": a.temperature,
                        "gradient_checkpointing": False, "bias_update": False, "precision": "fp32, CPU"}}
    print(f"TRL {trl_v}, transformers {tf_v}; {a.group} samples x {a.prompts_per_step} prompts per step, lr {a.lr}",
          flush=True)

    # ---- timing at fixed completion lengths
    res["timing"] = []
    if not a.skip_timing:
        for L in lengths:
            steps = a.timing_steps + 1
            d = dsv3_grpo(a, env, os.path.join(work, f"dsv3_L{L}"), steps, L, True,
                          os.path.join(work, f"dsv3_L{L}.log"))
            t = trl_grpo(a, env, os.path.join(work, f"trl_L{L}"), steps, L, True, os.path.join(work, f"trl_L{L}.log"),
                         None)
            ds_ = [r["step_seconds"] for r in d[1:]]
            ts_ = [r["step_seconds"] for r in t[1:]]
            row = {"length": L, "steps_timed": len(ds_), "dsv3_step_s": statistics.median(ds_),
                   "trl_step_s": statistics.median(ts_), "dsv3_all": ds_, "trl_all": ts_,
                   "dsv3_gen_s": statistics.median(r["gen_seconds"] for r in d[1:]),
                   "dsv3_train_s": statistics.median(r["train_seconds"] for r in d[1:]),
                   "dsv3_length": d[-1]["response_length"], "trl_length": t[-1].get("response_length")}
            row["ratio"] = row["trl_step_s"] / row["dsv3_step_s"]
            res["timing"].append(row)
            print(f"L={L}: dsv3 {row['dsv3_step_s']:.2f} s/step (sampling {row['dsv3_gen_s']:.2f} s), TRL "
                  f"{row['trl_step_s']:.2f} s/step -> TRL/dsv3 = {row['ratio']:.2f}x", flush=True)

    # ---- learning: the same steps on the task, then greedy held-out accuracy of both
    if a.skip_learning:
        prev = os.path.join(a.out, "grpo_vs_trl.json")
        if not os.path.exists(prev):
            fail(f"--skip-learning: no earlier results in {prev} to keep the learning comparison from")
        with open(prev) as f:
            old = json.load(f)
        L = old["learning"]
        L["from_run_of"] = L.get("from_run_of", old["date"])
        a.steps, a.max_new_tokens = L["steps"], L["max_new_tokens"]
    else:
        L = learn(a, env, work, heldout)
    res["learning"] = L
    report(a, res, L, trl_v, tf_v, torch_v)


def learn(a, env, work: str, heldout: str) -> dict:
    """The same GRPO steps on the task with both, then the greedy held-out accuracy of both final models."""
    L = {"steps": a.steps, "max_new_tokens": a.max_new_tokens}
    L["heldout_start"] = heldout_accuracy(a.model, heldout, a.heldout, a.max_new_tokens, env)
    d_out, t_out = os.path.join(work, "dsv3_learn"), os.path.join(work, "trl_learn")
    t0 = time.perf_counter()
    d = dsv3_grpo(a, env, d_out, a.steps, a.max_new_tokens, False, os.path.join(work, "dsv3_learn.log"))
    d_wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    t = trl_grpo(a, env, t_out, a.steps, a.max_new_tokens, False, os.path.join(work, "trl_learn.log"),
                 os.path.join(work, "trl_learn_model"))
    t_wall = time.perf_counter() - t0
    complete_export(a.model, os.path.join(work, "trl_learn_model"))
    keep = ("step", "reward", "reward_math", "reward_format", "accuracy", "kl", "response_length", "step_seconds")
    L["dsv3"] = {"steps": [{k: r.get(k) for k in keep} for r in d], "wall_s": d_wall,
                 "heldout": heldout_accuracy(os.path.join(d_out, "final"), heldout, a.heldout, a.max_new_tokens, env)}
    L["trl"] = {"steps": t, "wall_s": t_wall,
                "heldout": heldout_accuracy(os.path.join(work, "trl_learn_model"), heldout, a.heldout,
                                            a.max_new_tokens, env)}
    for name in ("dsv3", "trl"):
        rows = L[name]["steps"]
        k = min(5, len(rows))
        L[name]["first_accuracy"] = sum(r["accuracy"] for r in rows[:k]) / k
        L[name]["last_accuracy"] = sum(r["accuracy"] for r in rows[-k:]) / k
        L[name]["median_step_s"] = statistics.median(r["step_seconds"] for r in rows)
    return L


def report(a, res, L, trl_v, tf_v, torch_v) -> None:
    import torch

    h = {n: L[n]["heldout"] for n in ("dsv3", "trl")}
    res["no_worse_accuracy"] = h["dsv3"]["ci95"][1] >= h["trl"]["accuracy"]
    res["target_2x"] = {str(x["length"]): x["ratio"] >= 2.0 for x in res["timing"]}

    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "grpo_vs_trl.json"), "w") as f:
        json.dump(res, f, indent=1)
    plot(res, os.path.join(a.out, "grpo_vs_trl.png"))
    lines = [f"# GRPO: dsv3 vs TRL {trl_v} GRPOTrainer", "",
             f"{res['date']}, {res['cpus']} CPUs (shared), OMP_NUM_THREADS=1, fp32; TRL {trl_v} + transformers "
             f"{tf_v} + torch {torch_v} in benchmarks/work/trl-venv; dsv3 on torch {torch.__version__}.", "",
             f"Same model ({a.model}), prompts (the built-in addition task, dsv3's chat template; token ids checked "
             f"equal), rewards (dsv3's math + format functions), {a.group} samples × {a.prompts_per_step} prompts "
             f"per step, lr {a.lr} constant, AdamW (0.9, 0.95), no weight decay, clip-norm 1, loss type dapo, "
             f"ε 0.2, μ = 1, β = 0.04 (k3 KL to the starting model), temperature {a.temperature} (dsv3 takes the "
             f"ratio and KL on the raw policy's log-probabilities, TRL on the tempered ones), no gradient "
             f"checkpointing, no bias update.", "", "## Time per GRPO step", "",
             "| completion length | dsv3 s/step | TRL s/step | TRL / dsv3 | target ≥ 2× |", "|---|---|---|---|---|"]
    for x in res["timing"]:
        lines.append(f"| {x['length']} | {x['dsv3_step_s']:.2f} (sampling {x['dsv3_gen_s']:.2f}) | "
                     f"{x['trl_step_s']:.2f} | **{x['ratio']:.2f}×** | {'met' if x['ratio'] >= 2 else 'missed'} |")
    lines += ["", f"Median of {a.timing_steps} steps after an untimed first step; every completion exactly the "
              "stated length (dsv3 `--ignore-eos`, TRL `min_new_tokens`).", "",
              f"## Learning ({a.steps} steps, completions ≤ {a.max_new_tokens} tokens ending at end-of-sentence)"
              + (f" — from the run of {L['from_run_of']}" if L.get("from_run_of") else ""), "",
              "| | sample accuracy, first → last 5 steps | held-out accuracy (greedy) | 95% CI | median s/step |",
              "|---|---|---|---|---|"]
    s = L["heldout_start"]
    lines.append(f"| start (SFT model) | | {s['accuracy']:.1%} ({s['correct']}/{s['total']}) | "
                 f"{s['ci95'][0]:.1%} – {s['ci95'][1]:.1%} | |")
    for name, label in (("dsv3", "dsv3 grpo"), ("trl", "TRL GRPOTrainer")):
        x = L[name]
        r = x["heldout"]
        lines.append(f"| {label} | {x['first_accuracy']:.1%} → {x['last_accuracy']:.1%} | {r['accuracy']:.1%} "
                     f"({r['correct']}/{r['total']}) | {r['ci95'][0]:.1%} – {r['ci95'][1]:.1%} | "
                     f"{x['median_step_s']:.2f} |")
    lines += ["", "![grpo_vs_trl](grpo_vs_trl.png)", ""]
    with open(os.path.join(a.out, "grpo_vs_trl.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines[8:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--prompts-json", help=argparse.SUPPRESS)
    ap.add_argument("--log", help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    ap.add_argument("--fixed-length", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="runs/r1/sft/final", help="the exported starting model (HF layout)")
    ap.add_argument("--task", default="runs/r1/task", help="dsv3 r1-task directory (train.jsonl, heldout.jsonl)")
    ap.add_argument("--steps", type=int, default=40, help="GRPO steps of the learning comparison")
    ap.add_argument("--group", type=int, default=8, help="samples per prompt (the R1 demo's)")
    ap.add_argument("--prompts-per-step", type=int, default=16, help="(the R1 demo's)")
    ap.add_argument("--lr", type=float, default=5e-5, help="(the R1 demo's)")
    ap.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (the R1 demo's)")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="completion cap of the learning comparison")
    ap.add_argument("--lengths", default="128,256", help="fixed completion lengths of the timing")
    ap.add_argument("--timing-steps", type=int, default=2, help="timed steps per length (after an untimed one)")
    ap.add_argument("--heldout", type=int, default=1000, help="held-out problems for the final accuracy (the demo's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--skip-learning", action="store_true",
                    help="time only; the learning comparison is kept from the results already in --out (marked so)")
    ap.add_argument("--venv", default=DEFAULT_VENV, help="TRL's virtual environment")
    ap.add_argument("--setup", action="store_true", help="create the TRL venv (torch, then trl) before running")
    ap.add_argument("--work", default=os.path.join(ROOT, "benchmarks", "work", "grpo_vs_trl"))
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    a = ap.parse_args()
    if a.worker:
        worker(a)
    else:
        orchestrate(a)


if __name__ == "__main__":
    main()
