"""The built-in verifiable task: multi-digit addition, so the whole R1 chain runs on a CPU.

Every number is written digit by digit, the digits separated by spaces (``4 7``, not ``47``): the
quickstart model's 2048-token BPE splits numbers irregularly (``85`` is one token, ``132`` is ``1`` +
``32``, ``18`` two), so a tiny model would have to learn each multi-digit token's digits before it could
add; spaced digits are one token each. The answer ``<answer>1 3 2</answer>`` reads as 132 for the
``math`` reward (spaces inside a number are ignored).

``dsv3 r1-task --out DIR [--digits 2] [--seed 0]`` writes, from one seed, three disjoint sets of problems:

* ``sft.jsonl`` — the cold start: chat records whose answers are worked solutions in the R1 format,
  column addition from the units (each column's digits plus the carry, and their sum), the sum's digits
  in order, then the answer (a copy of the last line)::

      What is 4 7 + 8 5?   ->   <think>7+5=1 2
                                4+8+1=1 3
                                1 3 2</think>
                                <answer>1 3 2</answer>

* ``train.jsonl`` — prompts for GRPO (``{"prompt": "What is 4 7 + 8 5?", "answer": "132"}``);
* ``heldout.jsonl`` — prompts never seen in SFT or RL, for the accuracy after each stage.
"""

from __future__ import annotations

import argparse
import json
import os
import random

from ..errors import UserError, check_int, check_writable_dir


def problem(rng: random.Random, digits: int) -> tuple[int, int]:
    lo, hi = 10 ** (digits - 1), 10 ** digits - 1
    return rng.randint(lo, hi), rng.randint(lo, hi)


def spaced(n: int) -> str:
    """``132`` -> ``"1 3 2"``: a number as its digits separated by spaces (each one token)."""
    return " ".join(str(n))


def question(a: int, b: int) -> str:
    return f"What is {spaced(a)} + {spaced(b)}?"


def worked_solution(a: int, b: int) -> str:
    """The cold-start answer: one line per column from the units — the two digits, the carry when there
    is one, and their sum as two digits when it carries (``7+5=1 2``) —, the digits of the sum, then the
    answer, digit by digit."""
    da, db = str(a), str(b)
    n = max(len(da), len(db))
    da, db = da.zfill(n), db.zfill(n)
    lines, carry = [], 0
    for i in range(n - 1, -1, -1):
        x, y = int(da[i]), int(db[i])
        s = x + y + carry
        lines.append(f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={spaced(s)}")
        carry = s // 10
    lines.append(spaced(a + b))
    return "<think>" + "\n".join(lines) + f"</think>\n<answer>{spaced(a + b)}</answer>"


def make_sets(n_sft: int, n_train: int, n_heldout: int, digits: int, seed: int) -> dict[str, list[tuple[int, int]]]:
    """Disjoint problem sets (no (a, b) in two sets), a pure function of the arguments."""
    rng = random.Random(seed)
    lo, hi = 10 ** (digits - 1), 10 ** digits - 1
    space = (hi - lo + 1) ** 2
    need = n_sft + n_train + n_heldout
    if need > space // 2:
        raise UserError(f"{need} problems asked for, but {digits}-digit addition has only {space} "
                        f"(at most half may be used): ask for fewer, or more --digits")
    seen: set = set()
    out: dict[str, list] = {}
    for name, n in (("heldout", n_heldout), ("sft", n_sft), ("train", n_train)):
        items = []
        while len(items) < n:
            p = problem(rng, digits)
            if p not in seen:
                seen.add(p)
                items.append(p)
        out[name] = items
    return out


def write_task(out_dir: str, n_sft: int = 1000, n_train: int = 2000, n_heldout: int = 200, digits: int = 2,
               seed: int = 0, overwrite: bool = True) -> dict[str, str]:
    """Write sft.jsonl, train.jsonl and heldout.jsonl to ``out_dir``. Unless ``overwrite``, a file already
    there with other contents (another --seed, --digits or size) is a UserError and nothing is written."""
    sets = make_sets(n_sft, n_train, n_heldout, digits, seed)
    texts = {}
    for name, items in sets.items():
        lines = []
        for a, b in items:
            if name == "sft":
                rec = {"messages": [{"role": "user", "content": question(a, b)},
                                    {"role": "assistant", "content": worked_solution(a, b)}]}
            else:
                rec = {"prompt": question(a, b), "answer": str(a + b)}
            lines.append(json.dumps(rec) + "\n")
        texts[os.path.join(out_dir, f"{name}.jsonl")] = "".join(lines)
    if not overwrite:
        for path, text in texts.items():
            if os.path.lexists(path):
                try:
                    with open(path) as f:
                        same = f.read() == text
                except (OSError, UnicodeDecodeError):
                    same = False
                if not same:
                    raise UserError(f"--out {out_dir}: {os.path.basename(path)} is already there with other "
                                    f"contents; pass --overwrite to replace it (or write to another directory)")
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for (name, _), (path, text) in zip(sets.items(), texts.items()):
        with open(path, "w") as f:
            f.write(text)
        paths[name] = path
    return paths


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="directory for sft.jsonl, train.jsonl and heldout.jsonl")
    p.add_argument("--digits", type=int, default=2, help="digits of each operand (2: 10 + 10 … 99 + 99)")
    p.add_argument("--sft", type=int, default=1000, help="cold-start worked solutions")
    p.add_argument("--train", type=int, default=2000, help="GRPO prompts")
    p.add_argument("--heldout", type=int, default=200, help="held-out prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true",
                   help="replace task files already in --out that differ from the ones this run writes")


def run(args) -> int:
    check_int("--digits", args.digits, lo=1, hi=9)
    for flag in ("sft", "train", "heldout"):   # 0 wrote an empty file that SFT / GRPO / eval then refuse
        check_int("--" + flag, getattr(args, flag), lo=1)
    check_int("--seed", args.seed, lo=0)
    check_writable_dir("--out", args.out, "write the task files there")
    paths = write_task(args.out, args.sft, args.train, args.heldout, args.digits, args.seed,
                       overwrite=args.overwrite)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0
