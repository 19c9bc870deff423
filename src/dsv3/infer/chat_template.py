"""Chat templates: a model directory's ``chat_template`` rendered with jinja2 the way ``transformers``
renders it, or a DeepSeek-V3-style default when the directory has none.

The template comes from ``chat_template.jinja`` in the model directory, else from the
``chat_template`` entry of its ``tokenizer_config.json`` (a string, or a list of named templates of
which ``"default"`` is taken). It is compiled once in a sandboxed jinja2 environment with the
settings ``transformers`` uses (``trim_blocks``, ``lstrip_blocks``, the loop-controls extension, a
``tojson`` filter that keeps non-ASCII text, the ``raise_exception`` and ``strftime_now`` globals)
and rendered with ``messages``, ``add_generation_prompt`` and the tokenizer's special tokens
(``bos_token``, ``eos_token``, ``pad_token``).

The default follows DeepSeek-V3's own template: the beginning-of-sentence token, the system
prompts joined by blank lines, then ``<｜User｜>…`` and ``<｜Assistant｜>…<｜end▁of▁sentence｜>``
turns, and ``<｜Assistant｜>`` to ask for the next answer. An assistant turn with ``tool_calls`` writes
them as DeepSeek-V3's tool-call block after its content; ``tool`` messages (the results) become
``<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>…<｜tool▁output▁end｜>…<｜tool▁outputs▁end｜>``, after which
the model answers without a new ``<｜Assistant｜>`` (as DeepSeek-V3's template writes it).

A request's ``tools`` are passed to the template as ``tools`` (as ``transformers`` does); a template that
never mentions ``tools`` (DeepSeek-V3's own and the default) gets them as one more system message
describing the functions and the call format (:func:`dsv3.infer.tool_calls.tools_system_prompt`), after
the request's leading system messages.

OpenAI's ``developer`` role is the newer name of ``system``: a template that never mentions "developer"
(DeepSeek-V3's own, most Hugging Face ones) gets those messages as ``system`` ones, which it would
otherwise drop without a word or refuse (as vLLM and llama.cpp map them).

    tmpl = ChatTemplate.from_model_dir("runs/tiny/final", tokenizer)
    text = tmpl.render([{"role": "user", "content": "Hi"}])      # then tokenizer.encode(text)
"""

from __future__ import annotations

import json
import os
import re
from datetime import datetime

from .tool_calls import (CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, OUTPUT_BEGIN, OUTPUT_END, OUTPUTS_BEGIN,
                         OUTPUTS_END, SEP, tools_system_prompt)

USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"

DEFAULT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for m in messages if m['role'] in ('system', 'developer') -%}"
    "{{ m['content'] }}{% if not loop.last %}{{ '\\n\\n' }}{% endif %}"
    "{%- endfor -%}"
    "{%- set ns = namespace(in_tool=false) -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'tool' -%}"
    "{%- if ns.in_tool -%}{{ '\\n' }}{%- else -%}{{ '" + OUTPUTS_BEGIN + "' }}{%- endif -%}"
    "{{ '" + OUTPUT_BEGIN + "' + m['content'] + '" + OUTPUT_END + "' }}"
    "{%- set ns.in_tool = true -%}"
    "{%- else -%}"
    "{%- if ns.in_tool -%}{{ '" + OUTPUTS_END + "' }}{%- endif -%}"
    "{%- if m['role'] == 'user' -%}{{ '" + USER + "' + m['content'] }}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{%- if not ns.in_tool -%}{{ '" + ASSISTANT + "' }}{%- endif -%}"
    "{{ m['content'] or '' }}"
    "{%- if m.get('tool_calls') -%}{{ '" + CALLS_BEGIN + "' }}"
    "{%- for c in m['tool_calls'] -%}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '" + CALL_BEGIN + "' + c['type'] + '" + SEP + "' + c['function']['name'] + '\\n```json\\n' "
    "+ c['function']['arguments'] + '\\n```" + CALL_END + "' }}"
    "{%- endfor -%}{{ '" + CALLS_END + "' }}{%- endif -%}"
    "{{ eos_token }}"
    "{%- endif -%}"
    "{%- set ns.in_tool = false -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if ns.in_tool -%}{{ '" + OUTPUTS_END + "' }}{%- endif -%}"
    "{%- if add_generation_prompt and not ns.in_tool -%}{{ '" + ASSISTANT + "' }}{%- endif -%}"
)


class ChatTemplateError(ValueError):
    """The template failed for these messages (its own ``raise_exception`` included)."""


def _raise_exception(message):
    raise ChatTemplateError(str(message))


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _marker(messages: list[dict]) -> str:
    """A string of letters and digits that no message holds."""
    import secrets

    while True:
        marker = f"dsv3{secrets.token_hex(16)}"
        if not any(marker in str(m.get("content")) for m in messages):
            return marker


def find_template(model_dir: str) -> str | None:
    """The chat template a model directory carries, or None."""
    path = os.path.join(model_dir, "chat_template.jinja")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    path = os.path.join(model_dir, "tokenizer_config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        template = json.load(f).get("chat_template")
    if isinstance(template, list):       # [{"name": "default", "template": "…"}, {"name": "tool_use", …}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) and template else None


class ChatTemplate:
    """A compiled chat template and the special tokens it is rendered with."""

    def __init__(self, source: str, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, is_default: bool = False):
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self.template = env.from_string(source)
        except TemplateError as e:
            raise ValueError(f"the chat template does not compile: {e}") from None
        self.source, self.is_default = source, is_default
        self.knows_developer = "developer" in source
        self.knows_tools = re.search(r"\btools\b", source) is not None
        self.tokens = {"bos_token": bos_token or "", "eos_token": eos_token or "", "pad_token": pad_token or ""}

    @classmethod
    def from_model_dir(cls, model_dir: str, tokenizer) -> "ChatTemplate":
        source = find_template(model_dir)
        return cls(source or DEFAULT_TEMPLATE, getattr(tokenizer, "bos_token", None),
                   getattr(tokenizer, "eos_token", None), getattr(tokenizer, "pad_token", None),
                   is_default=source is None)

    def render(self, messages: list[dict], add_generation_prompt: bool = True,
               continue_final_message: bool = False, tools: list[dict] | None = None) -> str:
        """The prompt text for ``messages`` ([{"role", "content"}, …]); :class:`ChatTemplateError`
        if the template refuses them or fails. ``continue_final_message``: the text ends right after the
        last message's content, unterminated (no end-of-turn token, nothing the template writes after
        it), so that the model continues that message."""
        if not self.knows_developer:
            messages = [dict(m, role="system") if m.get("role") == "developer" else m for m in messages]
        if tools and not self.knows_tools:
            lead = next((i for i, m in enumerate(messages) if m.get("role") not in ("system", "developer")),
                        len(messages))
            messages = messages[:lead] + [{"role": "system", "content": tools_system_prompt(tools)}] + messages[lead:]
        if not continue_final_message:
            return self._render(messages, add_generation_prompt, tools)
        return self._render_continued(messages, add_generation_prompt, tools)

    def _render_continued(self, messages: list[dict], add_generation_prompt: bool, tools=None) -> str:
        """The messages rendered with a marker (random letters and digits, which no filter such as
        ``tojson`` or ``trim`` alters) right after the last one's content, cut where the marker lands: the
        end of that content however the template writes it (escaped, wrapped, after other messages that
        hold the same words). Another copy of the marker, if the template wrote the content twice, is
        taken out."""
        marker = _marker(messages)
        last = dict(messages[-1], content=(messages[-1].get("content") or "") + marker)
        text = self._render(messages[:-1] + [last], add_generation_prompt, tools)
        end = text.rfind(marker)
        if end < 0:
            raise ChatTemplateError("continue_final_message: the chat template does not write the last message's "
                                    "content as sent, so it cannot be continued")
        return text[:end].replace(marker, "")

    def _render(self, messages: list[dict], add_generation_prompt: bool, tools=None) -> str:
        from jinja2 import TemplateError

        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        tools=tools, **self.tokens)
        except ChatTemplateError:
            raise
        except (TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError,
                RecursionError, OverflowError) as e:
            raise ChatTemplateError(f"the chat template failed on these messages: {type(e).__name__}: {e}") from None
