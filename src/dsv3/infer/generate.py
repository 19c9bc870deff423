"""``dsv3 generate``: incremental decoding with the compressed MLA latent cache, streamed to stdout."""

from __future__ import annotations

import argparse
import os
import sys

import torch

from ..hf import FP8_MODES, resolve_fp8_mode
from .sampling import sample_next


@torch.no_grad()
def generate(model, prompt_ids: list[int], max_new_tokens: int = 64, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, eos_id=None, on_token=None,
             speculative: bool = False, stats: dict | None = None) -> list[int]:
    """Prefill the prompt into a latent cache, then decode one token at a time (or two per step
    with ``speculative``: MTP drafts, the main model verifies; :mod:`dsv3.infer.speculative`).
    ``eos_id``: the id, or a collection of ids (``tokenizer.stop_ids``), generation stops after.
    ``stats``, a dict, receives the speculative decoding statistics (acceptance rate …)."""
    if speculative:
        from .speculative import generate_speculative
        out, st = generate_speculative(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed,
                                       eos_id, on_token)
        if stats is not None:
            stats.update(st.as_dict())
        return out
    model.eval()
    stops = stop_set(eos_id)
    if not prompt_ids:
        raise ValueError("the prompt encodes to no tokens")
    max_pos = model.cfg.max_position_embeddings
    total = min(len(prompt_ids) + max_new_tokens, max_pos)
    if len(prompt_ids) >= max_pos:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the model handles {max_pos} positions")
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    cache = model.new_cache(1, total)
    tokens = torch.tensor([prompt_ids], device=device)
    logits = model(tokens, 0, cache)[:, -1]
    out, pos = [], len(prompt_ids)
    while pos < total:
        nxt = sample_next(logits, temperature, top_k, top_p, gen)
        tid = int(nxt[0])
        out.append(tid)
        if on_token is not None:
            on_token(tid)
        if tid in stops:
            break
        logits = model(nxt.view(1, 1), pos, cache)[:, -1]
        pos += 1
    return out


def stop_set(eos_id) -> frozenset[int]:
    """``eos_id`` of :func:`generate` (None, an id, or a collection of ids) as a set of ids."""
    if eos_id is None:
        return frozenset()
    return frozenset(int(t) for t in eos_id) if hasattr(eos_id, "__iter__") else frozenset((int(eos_id),))


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0, seed: int = 0, stream=None, speculative: bool = False,
                  stats: dict | None = None) -> str:
    """Generate and (optionally) stream the decoded text as it grows."""
    ids = tokenizer.encode(prompt, add_bos=tokenizer.add_bos_token and tokenizer.bos_id is not None)
    if stream is not None:
        stream.write(prompt)
        stream.flush()
    produced: list[int] = []
    shown = [0]

    def on_token(tid):
        produced.append(tid)
        if stream is not None:
            text = tokenizer.decode(produced)
            if not text.endswith("\ufffd"):          # wait for complete UTF-8 characters
                stream.write(text[shown[0]:])
                stream.flush()
                shown[0] = len(text)

    generate(model, ids, max_new_tokens, temperature, top_k, top_p, seed, tokenizer.stop_ids, on_token, speculative,
             stats)
    return prompt + tokenizer.decode(produced)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a model directory in the HF layout (with tokenizer.json)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling (default 0.95; not with --temperature 0)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest (default 50; not with "
                                                           "--temperature 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--speculative", action="store_true",
                   help="draft with the MTP module and verify two tokens per forward (same output distribution)")
    add_fp8_argument(p)
    add_memory_limit_argument(p)


def add_memory_limit_argument(p: argparse.ArgumentParser) -> None:
    """``--memory-limit GB`` (generate and serve)."""
    p.add_argument("--memory-limit", type=float, default=None, metavar="GB",
                   help="memory the pre-check may count on (default: what the device has free); a model whose "
                        "weights need more is refused before loading")


def check_weights_fit(model_dir: str, cfg, device: str, fp8: str, memory_limit: float | None, command: str,
                      experts: int | None = None, extra: dict[str, float] | None = None) -> None:
    """Refuse (UserError with the estimate) a model whose weights, as loaded, exceed the memory available;
    ``experts``: routed experts per MoE layer this process holds (expert-parallel serving; default all);
    ``extra``: other bytes asked for by name (serve's --cache-memory)."""
    from ..errors import check_finite
    from ..plan.local import check_fits, inference_bytes

    if memory_limit is not None:
        check_finite("--memory-limit", memory_limit, lo=0, lo_open=True)
    qcfg = cfg.quantization_config
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    kept = resolve_fp8_mode(fp8, qcfg, dev) != "dequant"
    check_fits({"weights": inference_bytes(cfg, fp8_kept=kept, experts=experts), **(extra or {})}, dev,
               memory_limit, f"{command} {model_dir}")


def check_fp8_flag(fp8: str, cfg, model_dir: str) -> None:
    """``--fp8 keep``/``weight-only`` ask for E4M3 weights to be kept: refused (UserError) for a checkpoint
    that has none, where they would change nothing."""
    from ..errors import UserError
    from ..hf import _is_fp8_config

    if fp8 in ("keep", "weight-only") and not _is_fp8_config(cfg.quantization_config):
        raise UserError(f"--fp8 {fp8}: {model_dir} is not an FP8 checkpoint (its config.json has no FP8 "
                        f"quantization_config), so there are no E4M3 weights to keep; dsv3 quantize writes one")


def add_fp8_argument(p: argparse.ArgumentParser) -> None:
    """``--fp8 {auto,keep,weight-only,dequant}`` (generate and serve)."""
    p.add_argument("--fp8", default="auto", choices=FP8_MODES,
                   help="FP8 checkpoints: keep the E4M3 weights and run block-scaled FP8 GEMMs with activations "
                        "quantised 1x128 (keep: W8A8, DeepSeek's recipe), keep them and dequantise blocks in each "
                        "call (weight-only: W8A16, the outputs of dequant at FP8 memory), or dequantise them at "
                        "load (dequant). auto: keep on a GPU with FP8 GEMMs (sm89+), weight-only elsewhere, for a "
                        "checkpoint with an FP8 quantization_config")


def load_model_dir(path: str, device: str = "auto", fp8: str = "auto"):
    """(model, tokenizer) from a model directory in the HF layout with its tokenizer.json; clear
    errors for a missing directory or tokenizer. ``device`` "auto": CUDA when there is one.
    ``fp8`` (--fp8): see :func:`dsv3.hf.load_pretrained` and :func:`dsv3.hf.resolve_fp8_mode`."""
    from ..hf import load_pretrained

    if fp8 not in FP8_MODES:
        raise ValueError(f"--fp8 {fp8!r}: expected one of {', '.join(FP8_MODES)}")
    tokenizer = load_tokenizer(path)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    return load_pretrained(path, device=device, fp8=fp8), tokenizer


def load_tokenizer(path: str):
    """The tokenizer.json of a model directory; clear errors for a missing directory or file. Its
    ``stop_ids`` hold every end-of-sequence id of the model (:func:`dsv3.hf.stop_token_ids`: an
    ``eos_token_id`` list in generation_config.json or config.json) besides the tokenizer's eos."""
    from ..data import Tokenizer
    from ..hf import stop_token_ids

    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory not found: {path}")
    tok_path = os.path.join(path, "tokenizer.json")
    if not os.path.exists(tok_path):
        raise FileNotFoundError(f"{path} has no tokenizer.json")
    tok = Tokenizer.from_file(tok_path)
    if os.path.isfile(os.path.join(path, "config.json")):
        tok.extra_stop_ids = frozenset(stop_token_ids(path))
    return tok


def check_greedy_filters(args, off: tuple = (None, None)) -> None:
    """--top-k / --top-p only shape sampling: with --temperature 0 (greedy) a given one is refused, not
    ignored. ``off``: the (top-k, top-p) values that mean "not given"."""
    from ..errors import UserError
    from .sampling import GREEDY_BELOW

    if args.temperature < GREEDY_BELOW:
        for flag, v, none in (("--top-k", args.top_k, off[0]), ("--top-p", args.top_p, off[1])):
            if v != none:
                raise UserError(f"{flag} {v}: it only applies when sampling; --temperature {args.temperature} "
                                "decodes greedily (drop one of them)")


def check_args(args) -> None:
    """Flag values generation cannot use (a UserError naming the flag), before the model is loaded."""
    from ..errors import check_device, check_finite, check_int

    check_int("--max-new-tokens", args.max_new_tokens, lo=1)
    check_finite("--temperature", args.temperature, lo=0)
    check_greedy_filters(args)
    args.top_p = 0.95 if args.top_p is None else args.top_p
    args.top_k = 50 if args.top_k is None else args.top_k
    check_finite("--top-p", args.top_p, lo=0, hi=1, lo_open=True)
    check_int("--top-k", args.top_k, lo=0)
    check_int("--seed", args.seed, lo=0, hi=2**63 - 1)
    check_device("--device", args.device)


def run(args) -> int:
    from ..hf import check_model_dir

    check_args(args)
    cfg = check_model_dir(args.model)
    check_fp8_flag(getattr(args, "fp8", "auto"), cfg, args.model)
    check_weights_fit(args.model, cfg, args.device, getattr(args, "fp8", "auto"), args.memory_limit, "generate")
    if cfg.defaulted:
        print(f"dsv3 generate: warning: {args.model}/config.json lacks keys that take transformers' defaults: "
              + ", ".join(f"{k}={v!r}" for k, v in cfg.defaulted.items()), file=sys.stderr)
    tokenizer = load_tokenizer(args.model)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"{args.model}: tokenizer.json has {tokenizer.vocab_size} ids but config.json's vocab_size "
                         f"is {cfg.vocab_size} (they belong to different models)")
    model, tokenizer = load_model_dir(args.model, args.device, getattr(args, "fp8", "auto"))
    if args.speculative and not len(model.mtp):
        raise ValueError(f"--speculative: {args.model} has no MTP module (num_nextn_predict_layers = 0)")
    n_prompt = len(tokenizer.encode(args.prompt, add_bos=tokenizer.add_bos_token and tokenizer.bos_id is not None))
    room = model.cfg.max_position_embeddings - n_prompt
    if n_prompt and 0 < room < args.max_new_tokens:
        print(f"dsv3 generate: warning: --max-new-tokens {args.max_new_tokens}: the model has "
              f"{model.cfg.max_position_embeddings} positions and the prompt takes {n_prompt}, so at most {room} "
              f"tokens are generated", file=sys.stderr)
    stats: dict = {}
    generate_text(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_k,
                  args.top_p, args.seed, stream=sys.stdout, speculative=args.speculative, stats=stats)
    sys.stdout.write("\n")
    if stats:
        print(f"speculative: {stats['accepted']}/{stats['drafted']} drafts accepted "
              f"({stats['acceptance_rate']:.1%}), {stats['tokens_per_forward']:.2f} tokens per forward",
              file=sys.stderr)
    return 0
