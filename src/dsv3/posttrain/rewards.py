"""Rule-based rewards (DeepSeek-R1 §2.2.2): accuracy and format, no reward model.

A reward function is ``fn(completion: str, answer: str | None, **record) -> float`` where ``completion``
is the generated assistant text, ``answer`` the reference answer of the prompt record (``None`` when it
has none) and ``record`` the rest of the prompt record's fields. Built-in names:

* ``math`` (alias ``accuracy``): 1.0 when the *final* answer — the last ``\\boxed{…}`` or the last
  ``<answer>…</answer>``, whichever comes later in the text — equals the reference: numerically when
  both read as numbers (``1,234`` = ``1234.0`` = ``+1234``; ``1/2`` = ``0.5``; spaces inside a number
  ignored, so the built-in task's digit-by-digit ``1 3 2`` = ``132``; ``$12$``, ``12.`` and ``\\text{…}``
  wrappers tolerated), else as text (case and whitespace folded). No answer: 0.0.
* ``format``: 1.0 when the completion is ``<think>…</think>`` (one block, nothing before it) followed by
  an answer (``<answer>…</answer>`` or ``\\boxed{…}``), else 0.0.

Any other name is ``package.module:function`` (imported on use; a clear error when it is not there).
"""

from __future__ import annotations

import importlib
import math
import re
from fractions import Fraction
from typing import Callable

from ..errors import UserError

RewardFn = Callable[..., float]

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S)


def _boxed_spans(text: str) -> list[tuple[int, str]]:
    """(start, content) of every ``\\boxed{…}`` with balanced braces (unclosed ones are skipped)."""
    out, i = [], 0
    while True:
        i = text.find("\\boxed{", i)
        if i < 0:
            return out
        j, depth = i + len("\\boxed{"), 1
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        if depth == 0:
            out.append((i, text[i + len("\\boxed{"):j - 1]))
        i += len("\\boxed{")


def extract_answer(text: str) -> str | None:
    """The final answer of a completion: the content of the last ``\\boxed{…}`` or ``<answer>…</answer>``
    (whichever starts later), stripped; None when there is neither (or only unclosed ones)."""
    if not isinstance(text, str):
        return None
    found = [(m.start(), m.group(1)) for m in _ANSWER_TAG.finditer(text)] + _boxed_spans(text)
    if not found:
        return None
    return max(found, key=lambda x: x[0])[1].strip()


_WRAPPERS = (re.compile(r"^\\text\{(.*)\}$", re.S), re.compile(r"^\\mathrm\{(.*)\}$", re.S),
             re.compile(r"^\\boxed\{(.*)\}$", re.S), re.compile(r"^\$(.*)\$$", re.S))
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_GROUPED = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d*)?$")


def _unwrap(s: str) -> str:
    s = s.strip()
    changed = True
    while changed:
        changed = False
        for w in _WRAPPERS:
            m = w.match(s)
            if m:
                s, changed = m.group(1).strip(), True
    return s.rstrip(".").strip()


def parse_number(s: str) -> Fraction | None:
    """A number written as an integer, a decimal (``1,234.50`` with thousands commas, ``.5``, ``1e3``),
    a fraction ``a/b`` or ``\\frac{a}{b}``, in optional ``$…$`` / ``\\text{…}`` wrappers; spaces are ignored
    (``1 3 2`` is 132: digits written one token each); None otherwise."""
    if not isinstance(s, str):
        return None
    s = _unwrap(s).replace(" ", "").replace("\\!", "").replace("{,}", ",")
    m = re.match(r"^([+-]?)\\d?frac\{([^{}]*)\}\{([^{}]*)\}$", s)
    if m:
        a, b = parse_number(m.group(2)), parse_number(m.group(3))
        if a is None or b is None or b == 0:
            return None
        return (-1 if m.group(1) == "-" else 1) * a / b
    if s.count("/") == 1:
        a, b = (parse_number(x) for x in s.split("/"))
        if a is None or b is None or b == 0:
            return None
        return a / b
    if _GROUPED.match(s):
        s = s.replace(",", "")
    if not _NUMBER.match(s):
        return None
    try:
        value = Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    return value


def answers_match(given: str | None, reference) -> bool:
    """Whether an extracted answer equals the reference: numerically when both are numbers (exact for
    integers, decimals and fractions), else as text with case and whitespace folded."""
    if given is None or reference is None:
        return False
    ref = reference if isinstance(reference, str) else str(reference)
    a, b = parse_number(given), parse_number(ref)
    if a is not None and b is not None:
        return a == b
    if (a is None) != (b is None):
        return False
    fold = lambda s: " ".join(_unwrap(s).split()).casefold()   # noqa: E731
    return fold(given) == fold(ref)


def math_reward(completion: str, answer=None, **_) -> float:
    """1.0 when the final answer equals the reference answer, else 0.0."""
    return 1.0 if answers_match(extract_answer(completion), answer) else 0.0


_FORMAT = re.compile(r"^\s*<think>(?P<think>.*?)</think>\s*(?P<rest>.*)$", re.S)


def format_reward(completion: str, answer=None, **_) -> float:
    """1.0 for ``<think>…</think>`` (exactly one block, first) then an answer, else 0.0."""
    if not isinstance(completion, str):
        return 0.0
    m = _FORMAT.match(completion)
    if not m or "<think>" in m.group("think") or "<think>" in m.group("rest") or "</think>" in m.group("rest"):
        return 0.0
    rest = m.group("rest")
    return 1.0 if (_ANSWER_TAG.search(rest) or _boxed_spans(rest)) else 0.0


BUILTIN: dict[str, RewardFn] = {"math": math_reward, "accuracy": math_reward, "format": format_reward}


def resolve(name: str) -> RewardFn:
    """A reward function by built-in name or ``module:function`` (UserError naming it otherwise)."""
    name = name.strip()
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise UserError(f"--reward {name!r}: not a built-in reward ({', '.join(BUILTIN)}) nor module:function")
    modname, _, fn = name.partition(":")
    try:
        mod = importlib.import_module(modname)
    except ImportError as e:
        raise UserError(f"--reward {name}: cannot import module {modname!r} ({e})") from None
    f = getattr(mod, fn, None)
    if not callable(f):
        raise UserError(f"--reward {name}: module {modname!r} has no function {fn!r}")
    return f


def parse_rewards(spec: str) -> list[tuple[str, RewardFn]]:
    """``"math,format"`` → [(name, fn)]; weights as ``name=w`` are not taken: every reward counts once."""
    names = [s.strip() for s in (spec or "").split(",") if s.strip()]
    if not names:
        raise UserError("--reward: name at least one reward function (e.g. math,format)")
    if len(set(names)) != len(names):
        raise UserError(f"--reward {spec}: a reward is named twice")
    return [(n, resolve(n)) for n in names]


def score(fns: list[tuple[str, RewardFn]], completion: str, record: dict) -> dict[str, float]:
    """Each reward function's value for one completion (a finite float; else a UserError naming it)."""
    fields = {k: v for k, v in record.items() if k not in ("answer", "completion")}
    out = {}
    for name, fn in fns:
        if name in BUILTIN:
            v = fn(completion, record.get("answer"), **fields)
        else:   # the user's module:function: its failure is theirs to fix, not an internal error
            try:
                v = fn(completion, record.get("answer"), **fields)
            except Exception as e:  # noqa: BLE001 - any exception of the user's code
                raise UserError(f"--reward {name}: raised {type(e).__name__}: {e} (it is called as "
                                f"fn(completion, answer, **record) and must return a number)") from None
        if isinstance(v, bool):
            v = float(v)
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            raise UserError(f"--reward {name}: returned {v!r}; a reward must be a finite number")
        out[name] = float(v)
    return out
