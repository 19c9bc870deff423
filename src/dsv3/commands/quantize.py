"""``dsv3 quantize --model DIR --out DIR [--fp8-embeddings] [--overwrite]``: write a model directory
as an FP8 checkpoint in DeepSeek's layout.

The Linear weights (attention, dense FFNs, routed and shared experts, the MTP projection) become
E4M3 with a float32 ``weight_scale_inv`` per 128×128 block and ``config.json`` gets DeepSeek's
``quantization_config``, exactly as the official FP8 release is stored; embedding, output head, MoE
gate and norms keep their dtype. ``--fp8-embeddings`` quantises the embedding table and the output
head as well (not done in the release, where they are 0.4% of the bytes; in a small model they can
be a third). ``dsv3 serve``/``generate`` then keep those weights FP8 in memory (``--fp8 auto``).

An FP8 source is read dequantised and quantised again (the same E4M3 values and scales). The
tokenizer files are copied. The output is written to a temporary directory next to ``--out`` and
moved into place at the end, so an interrupted run leaves no half-written model.
"""

from __future__ import annotations

import argparse
import os
import shutil

from ..errors import UserError

COPIED = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR", help="the model directory to quantise (HF layout)")
    parser.add_argument("--out", required=True, metavar="DIR", help="where to write the FP8 checkpoint")
    parser.add_argument("--fp8-embeddings", action="store_true",
                        help="quantise the embedding and the output head too (not done in DeepSeek's release)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out when it already holds files")


def _check_out(model: str, out: str, overwrite: bool) -> None:
    """Before any work: --out can take the FP8 copy. With --overwrite an existing --out is deleted at the
    end, so it must be a model directory (config.json), or empty, and must not hold --model."""
    if not out.strip():
        raise UserError("--out: empty path")
    model_path, out_path = os.path.realpath(model), os.path.realpath(out)
    if model_path == out_path:
        raise UserError(f"--out {out}: the same directory as --model (write the FP8 copy elsewhere)")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out}: exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out):
        if not overwrite:
            raise UserError(f"--out {out}: already holds files (pass --overwrite to replace them)")
        if model_path.startswith(out_path.rstrip(os.sep) + os.sep):
            raise UserError(f"--out {out}: holds --model {model}; --overwrite would delete the model it reads")
        if not os.path.isfile(os.path.join(out, "config.json")):
            raise UserError(f"--out {out}: holds files but no config.json, so it is not a model directory "
                            f"--overwrite may replace; give an empty or new directory")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise UserError(f"--out {out}: its parent directory {parent} does not exist")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..fp8.inference import fp8_weight_bytes
    from ..hf import check_model_dir, load_pretrained, save_pretrained

    cfg = check_model_dir(args.model)
    _check_out(args.model, args.out, args.overwrite)
    if args.fp8_embeddings and cfg.tie_word_embeddings:
        raise UserError(f"--fp8-embeddings: {args.model} ties its embedding and output head "
                        "(tie_word_embeddings), which stay in their dtype")
    model = load_pretrained(args.model, dtype=torch.bfloat16, fp8="dequant")
    before = fp8_weight_bytes(model)["total"]
    out = os.path.abspath(args.out)
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_pretrained(model, tmp, fp8=True, fp8_embeddings=args.fp8_embeddings)
        for name in COPIED:
            if os.path.isfile(os.path.join(args.model, name)):
                shutil.copy(os.path.join(args.model, name), os.path.join(tmp, name))
        kept = load_pretrained(tmp, dtype=torch.bfloat16, fp8="weight-only")   # check it loads, and its size
        after = fp8_weight_bytes(kept)["total"]
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    what = "Linears, embedding and head" if args.fp8_embeddings else "Linears (DeepSeek's release layout)"
    print(f"wrote {args.out}: {what} in E4M3 with 128x128 scales; weights kept FP8 take "
          f"{after / 2**20:,.2f} MiB against {before / 2**20:,.2f} MiB in BF16 ({after / before:.3f}x)")
    return 0
