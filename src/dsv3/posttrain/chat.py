"""Chat data: OpenAI-style ``{"messages": [{"role", "content"}, …]}`` records rendered with the model's
chat template (:mod:`dsv3.infer.chat_template`, the one ``dsv3 serve`` uses) into token ids with a mask
that is 1 exactly on the assistant turns' tokens (their content and the end-of-sentence token the
template closes them with) — and the SFT dataset built from them.

The conversation is rendered turn by turn: the text before assistant turn k is the template applied to
the messages before it *with* the generation prompt (exactly what the server feeds the model before it
answers), and the turn's own text is what rendering it adds. Each piece is tokenised on its own, so the
prompt part of every record is tokenised as the server tokenises a prompt, and the assistant tokens
are the ones the model must produce after it.

Prompt files (``dsv3 grpo``, ``dsv3 sample``): JSON lines with ``"prompt"`` (a user message) or
``"messages"`` (a conversation ending in a user turn), and optionally ``"answer"`` (what the rewards
compare with); other fields are passed on to the reward functions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..errors import UserError, iter_jsonl, json_kind

IGNORE = -100        # targets that carry no loss (cross_entropy's ignore_index)
ROLES = ("system", "developer", "user", "assistant")


def check_messages(messages, where: str) -> list[dict]:
    """The ``messages`` of a record, checked (UserError naming ``where`` and the field)."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects, "
                        f"found {json_kind(messages)}")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict):
            raise UserError(f"{where}: messages[{j}] must be an object, found {json_kind(m)}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise UserError(f"{where}: messages[{j}].role must be one of {', '.join(ROLES)}, found {json_kind(role)}")
        if not isinstance(content, str):
            raise UserError(f"{where}: messages[{j}].content must be a string, found {json_kind(content)}")
        out.append({"role": role, "content": content})
    return out


def encode_chat(template, tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(token ids, mask) of a conversation: mask 1 on assistant-turn tokens, 0 elsewhere. ValueError
    when the template does not render the conversation incrementally (each turn appended)."""
    ids: list[int] = []
    mask: list[int] = []
    done = ""
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = template.render(messages[:k], add_generation_prompt=True)
        upto = template.render(messages[:k + 1], add_generation_prompt=False)
        if not before.startswith(done) or not upto.startswith(before):
            raise ValueError("the chat template does not render the conversation turn by turn (a turn changes "
                             "the text before it), so the assistant tokens cannot be told apart")
        part = tokenizer.encode(before[len(done):])
        answer = tokenizer.encode(upto[len(before):])
        ids += part + answer
        mask += [0] * len(part) + [1] * len(answer)
        done = upto
    full = template.render(messages, add_generation_prompt=False)
    if not full.startswith(done):
        raise ValueError("the chat template does not render the conversation turn by turn")
    if len(full) > len(done):
        tail = tokenizer.encode(full[len(done):])
        ids += tail
        mask += [0] * len(tail)
    return ids, mask


def prompt_ids(template, tokenizer, messages: list[dict]) -> list[int]:
    """The tokens the model answers after: the conversation with the generation prompt."""
    return tokenizer.encode(template.render(messages, add_generation_prompt=True))


def read_chat_file(path: str, flag: str = "--data") -> list[list[dict]]:
    """The conversations of a chat .jsonl file; each must hold at least one assistant turn."""
    if not os.path.exists(path):
        raise UserError(f"{flag} {path}: file not found")
    out = []
    for lineno, rec in iter_jsonl(path, f"{flag} file"):
        where = f"{flag} {path} line {lineno}"
        msgs = check_messages(rec.get("messages"), where)
        if not any(m["role"] == "assistant" for m in msgs):
            raise UserError(f"{where}: the conversation has no assistant turn to learn from")
        out.append(msgs)
    if not out:
        raise UserError(f"{flag} {path}: holds no records")
    return out


def read_prompt_file(path: str, flag: str = "--prompts") -> list[dict]:
    """Prompt records: each with ``messages`` (a user message from ``prompt`` when given as text) and
    the record's other fields (``answer`` …)."""
    if not os.path.exists(path):
        raise UserError(f"{flag} {path}: file not found")
    out = []
    for lineno, rec in iter_jsonl(path, f"{flag} file"):
        where = f"{flag} {path} line {lineno}"
        if "messages" in rec:
            msgs = check_messages(rec["messages"], where)
            if msgs[-1]["role"] == "assistant":
                raise UserError(f"{where}: the conversation must end in a user turn (the model answers it)")
        elif isinstance(rec.get("prompt"), str):
            msgs = [{"role": "user", "content": rec["prompt"]}]
        else:
            raise UserError(f"{where}: a prompt record needs 'prompt' (a string) or 'messages', found keys "
                            f"{sorted(rec)[:6]}")
        if "answer" in rec and not isinstance(rec["answer"], (str, int, float)):
            raise UserError(f"{where}: 'answer' must be a string or a number, found {json_kind(rec['answer'])}")
        out.append({**{k: v for k, v in rec.items() if k not in ("prompt", "messages")}, "messages": msgs})
    if not out:
        raise UserError(f"{flag} {path}: holds no records")
    return out


@dataclass
class Encoded:
    ids: list[int]
    mask: list[int]


class SFTDataset:
    """Chat records as training rows for :class:`dsv3.train.trainer.Trainer`: one record per row (no
    attention across records), truncated to ``seq_len + 1 + extra`` tokens and right-padded; targets are
    the next tokens where the mask is 1 and ``IGNORE`` elsewhere (prompt, system, padding).

    ``batch(step, …)`` is a pure function of (seed, step): the records in a fresh permutation per epoch."""

    def __init__(self, records: list[Encoded], seq_len: int, pad_id: int, vocab_size: int):
        if not records:
            raise ValueError("no records")
        self.records, self.seq_len, self.pad_id, self.vocab_size = records, seq_len, pad_id, vocab_size
        self.path = None
        self.truncated = sum(len(r.ids) > seq_len + 1 for r in records)

    def __len__(self) -> int:
        return len(self.records)

    def rows(self, indices: list[int], extra: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        length = self.seq_len + 1 + extra
        w = torch.full((len(indices), length), self.pad_id, dtype=torch.long)
        m = torch.zeros((len(indices), length), dtype=torch.bool)
        for r, i in enumerate(indices):
            rec = self.records[i]
            n = min(len(rec.ids), length)
            w[r, :n] = torch.tensor(rec.ids[:n])
            m[r, :n] = torch.tensor(rec.mask[:n], dtype=torch.bool)
        targets = w[:, 1:].masked_fill(~m[:, 1:], IGNORE)
        return w[:, :-1].contiguous(), targets.contiguous()

    def order(self, epoch: int, seed: int) -> list[int]:
        g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))
        return torch.randperm(len(self.records), generator=g).tolist()

    def batch(self, step: int, batch_size: int, seed: int = 0, extra: int = 0, rank: int = 0,
              world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.records)
        first = (step * world_size + rank) * batch_size
        idx, orders = [], {}
        for i in range(first, first + batch_size):
            e = i // n
            if e not in orders:
                orders[e] = self.order(e, seed)
            idx.append(orders[e][i % n])
        return self.rows(idx, extra)

    def val_batches(self, batch_size: int, max_batches: int | None = None, extra: int = 0):
        n = len(self.records) if max_batches is None else min(len(self.records), max_batches * batch_size)
        for b in range(0, n, batch_size):
            yield self.rows(list(range(b, min(b + batch_size, n))), extra)


def check_targets(records: list[Encoded], seq_len: int, path: str, flag: str = "--data") -> None:
    """Every record keeps an assistant token within the ``seq_len + 1`` tokens a row holds (a UserError
    otherwise: a batch of such records has no target, and its loss is 0/0)."""
    empty = [k for k, r in enumerate(records) if not any(r.mask[1:seq_len + 1])]
    if empty:
        first = records[empty[0]]
        start = next((j for j, v in enumerate(first.mask) if v), len(first.mask))
        others = f" and {len(empty) - 1} other(s)" if len(empty) > 1 else ""
        raise UserError(f"--seq-len {seq_len}: {flag} {path} record {empty[0] + 1}{others}: no assistant token in "
                        f"the first {seq_len + 1} tokens (record {empty[0] + 1}'s answer starts at token {start}), so "
                        f"nothing to learn from; raise --seq-len or shorten those prompts")


def encode_file(path: str, template, tokenizer, flag: str = "--data") -> list[Encoded]:
    out = []
    for k, msgs in enumerate(read_chat_file(path, flag)):
        try:
            ids, mask = encode_chat(template, tokenizer, msgs)
        except ValueError as e:
            raise UserError(f"{flag} {path} record {k + 1}: {e}") from None
        out.append(Encoded(ids, mask))
    return out
