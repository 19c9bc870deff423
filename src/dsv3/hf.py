"""Checkpoints in the Hugging Face layout (SPEC §1.5): ``load_pretrained`` and ``save_pretrained``.

A directory holds ``config.json`` and one ``model.safetensors`` or shards listed in
``model.safetensors.index.json``. Names follow DeepSeek's release:

    model.embed_tokens.weight, model.norm.weight, lm_head.weight
    model.layers.{i}.self_attn.{q_a_proj,q_a_layernorm,q_b_proj | q_proj, kv_a_proj_with_mqa,
                               kv_a_layernorm, kv_b_proj, o_proj}.weight
    model.layers.{i}.mlp.{gate_proj,up_proj,down_proj}.weight                  dense layers
    model.layers.{i}.mlp.gate.weight, .gate.e_score_correction_bias            MoE layers
    model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight, mlp.shared_experts.*
    model.layers.{L+k}.{enorm,hnorm,eh_proj,shared_head.norm,shared_head.head,embed_tokens} + block  MTP

Our modules store the routed experts stacked (``w13`` = gate ‖ up, ``w2`` = down) for the grouped
GEMM; this file is the one place that maps between the two layouts. FP8 checkpoints (E4M3 weights
with a float32 ``weight_scale_inv`` per 128×128 block) are dequantised on load, or — with
``load_pretrained(..., fp8="keep")`` — kept in E4M3 and executed by the block-scaled FP8 GEMM
(:mod:`dsv3.fp8.inference`; ``fp8="weight-only"`` keeps them too but dequantises block by block in
each call): the quantised Linears become ``FP8InferenceLinear`` and the routed
experts ``FP8InferenceExperts``; ``kv_b_proj`` is still dequantised (absorbed MLA reads its
weight as a matrix); norms and gate are as stored; embedding and head are as stored too — BF16 in
DeepSeek's release, E4M3 (``FP8InferenceEmbedding`` / ``FP8InferenceLinear``) in a checkpoint written
with ``save_pretrained(fp8=True, fp8_embeddings=True)``.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Iterator

import torch
from torch import nn

from .config import ModelConfig

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


# ---------------------------------------------------------------------------------- name mapping
def _hf_names(model: nn.Module) -> Iterator[tuple[str, str, int | None, str | None]]:
    """(our state-dict key, HF key, expert index or None, which part of a stacked expert weight)."""
    cfg: ModelConfig = model.cfg
    L = cfg.num_hidden_layers
    for key in model.state_dict():
        if key.endswith("_scale_inv"):       # FP8 scales of kept weights: see hf_state_dict
            continue
        if key.startswith("mtp."):
            k, rest = key[4:].split(".", 1)
            prefix, rest = f"model.layers.{L + int(k)}.", rest
        elif key.startswith("lm_head."):
            if cfg.tie_word_embeddings:
                continue
            yield key, key, None, None
            continue
        else:
            prefix, rest = "model.", key
        m = re.fullmatch(r"(.*mlp)\.experts\.(w13|w2)", rest)
        if m:
            parts = ("gate_proj", "up_proj") if m.group(2) == "w13" else ("down_proj",)
            # an expert-parallel layer holds only its slots: the logical expert of each (the routed
            # count meaning the shared expert, placed as a routed one)
            owner = model.get_submodule(key[:-len(".experts." + m.group(2))])
            slots = owner.local_logical.tolist() if hasattr(owner, "local_logical") else range(cfg.n_routed_experts)
            for row, e in enumerate(slots):
                where = f"experts.{e}" if e < cfg.n_routed_experts else "shared_experts"
                for part in parts:
                    yield key, f"{prefix}{m.group(1)}.{where}.{part}.weight", row, part
        else:
            yield key, prefix + rest, None, None


def _mtp_shared_names(cfg: ModelConfig) -> list[str]:
    """Copies of the shared embedding and head that the HF layout stores in each MTP layer."""
    L = cfg.num_hidden_layers
    out = []
    for k in range(cfg.num_nextn_predict_layers):
        out += [f"model.layers.{L + k}.embed_tokens.weight", f"model.layers.{L + k}.shared_head.head.weight"]
    return out


# ---------------------------------------------------------------------------------- reading
class _TensorSource:
    """Lazy access to the tensors of a safetensors checkpoint directory (single file or shards)."""

    def __init__(self, path: str):
        from safetensors import safe_open

        from .errors import read_json

        if not os.path.isdir(path):
            raise FileNotFoundError(f"checkpoint directory not found: {path}")
        index = os.path.join(path, _INDEX)
        self.path, self._open, self._safe_open = path, {}, safe_open
        if os.path.exists(index):
            weight_map = read_json(index, "weight index").get("weight_map")
            if not isinstance(weight_map, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise ValueError(f"weight index {index} has no 'weight_map' object of tensor name -> file name")
            for fn in sorted(set(weight_map.values())):
                if not os.path.isfile(os.path.join(path, fn)):
                    raise FileNotFoundError(f"{index} names shard {fn}, which is missing from {path}")
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if not files:
                raise FileNotFoundError(f"no .safetensors files in {path}")
            weight_map = {}
            for fn in files:
                weight_map.update({k: fn for k in self._open_file(fn)[1]})
        self.weight_map = weight_map

    def _open_file(self, fn: str):
        """(handle, tensor names) of one safetensors file; a ValueError naming it when it is not one."""
        if fn not in self._open:
            full = os.path.join(self.path, fn)
            try:
                handle = self._safe_open(full, "pt")
                self._open[fn] = (handle, set(handle.keys()))
            except FileNotFoundError:
                raise
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error type
                raise ValueError(f"weights file {full} cannot be read: {e} (truncated, empty or not a "
                                 f"safetensors file)") from None
        return self._open[fn]

    def keys(self) -> set[str]:
        return set(self.weight_map)

    def _handle(self, name: str):
        fn = self.weight_map[name]
        if fn not in self._open and not os.path.exists(os.path.join(self.path, fn)):
            raise FileNotFoundError(f"{_INDEX} names shard {fn}, which is missing from {self.path}")
        handle, names = self._open_file(fn)
        if name not in names:
            raise ValueError(f"{_INDEX} places {name} in {fn}, which does not hold it (missing tensor)")
        return handle

    def dtype(self, name: str) -> str:
        """The stored dtype's safetensors name ("F8_E4M3", "BF16", …) without reading the tensor."""
        return self._handle(name).get_slice(name).get_dtype()

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._handle(name).get_tensor(name)
        except (ValueError, FileNotFoundError):
            raise
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type
            raise ValueError(f"weights file {os.path.join(self.path, self.weight_map[name])}: tensor {name} cannot "
                             f"be read ({e})") from None

    def check(self) -> None:
        """Open every file the weight map names (headers only): bad files fail here, before any allocation."""
        for fn in sorted(set(self.weight_map.values())):
            self._open_file(fn)


def check_model_dir(path: str | os.PathLike) -> ModelConfig:
    """Check a model directory without loading weights: config.json, the weight index and every
    safetensors header (a ValueError / FileNotFoundError naming the file). Returns its config."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory not found: {path}")
    cfg = ModelConfig.from_hf(path)
    _TensorSource(path).check()
    return cfg


GENERATION_CONFIG = "generation_config.json"
# keys of a generation_config.json that describe the file, not the model's generation defaults: not carried
# into an export (transformers' ``_from_model_config`` would have generate() rebuild the file from config.json)
_GENERATION_FILE_KEYS = ("_from_model_config", "transformers_version")


def read_generation_config(path: str | os.PathLike, cfg: ModelConfig | None = None) -> dict | None:
    """A model directory's ``generation_config.json`` as a dict, None without one. Its ``eos_token_id``
    (an id, a list of ids, or null) is checked by ModelConfig's own eos_token_id rules against the model's
    vocabulary (``cfg``, else config.json); a bad file or value is a ValueError naming the file and field."""
    from .errors import read_json

    path = os.fspath(path)
    gen = os.path.join(path, GENERATION_CONFIG)
    if not os.path.isfile(gen):
        return None
    data = read_json(gen, "generation config")
    if "eos_token_id" in data:
        v = data["eos_token_id"]
        cfg = cfg if cfg is not None else ModelConfig.from_hf(path)
        try:                                   # checked as config.json's eos_token_id is
            cfg.replace(eos_token_id=v)
        except ValueError as e:
            why = str(e).removeprefix(f"ModelConfig.eos_token_id = {v!r}: ")
            raise ValueError(f"{gen}: eos_token_id = {json.dumps(v)[:60]}: {why}") from None
    return data


def stop_token_ids(path: str | os.PathLike, cfg: ModelConfig | None = None) -> tuple[int, ...]:
    """The end-of-sequence ids a model directory's generation stops on, as transformers reads them:
    ``generation_config.json``'s ``eos_token_id`` (an id or a list of ids) when that file gives one, else
    ``config.json``'s (``cfg`` when already read). A bad value is a ValueError naming the file and field."""
    path = os.fspath(path)
    cfg = cfg if cfg is not None else ModelConfig.from_hf(path)
    gen = read_generation_config(path, cfg)
    if gen is not None and "eos_token_id" in gen:
        return cfg.replace(eos_token_id=gen["eos_token_id"]).eos_token_ids
    return cfg.eos_token_ids


def export_generation_config(cfg: ModelConfig, source: dict | None = None) -> dict:
    """The ``generation_config.json`` of an export: ``source`` (the generation config of the checkpoint
    the model was loaded from: its sampling defaults, and its token ids where it gives them, which are
    what generation stopped on) without the keys describing that file, and the model's ``bos_token_id``,
    ``eos_token_id`` (a list kept whole) and ``pad_token_id`` where it gives none. No sampling default is
    made up: without a source the file holds the token ids only. A null id of the model is left out (as
    transformers leaves out defaults), so it does not hide an id a later edit of config.json gives."""
    out: dict = {}
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = getattr(cfg, k)
        if v is not None:
            out[k] = list(v) if isinstance(v, list) else v
    out.update({k: copy.deepcopy(v) for k, v in (source or {}).items() if k not in _GENERATION_FILE_KEYS})
    return out


def _read(src: _TensorSource, name: str, dtype: torch.dtype, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """Tensor `name` in `dtype`; an FP8 one multiplied out with its ``weight_scale_inv``, one scale per
    ``block`` (config.json's ``quantization_config.weight_block_size``, [rows, columns])."""
    t = src.get(name)
    scale_name = name[: -len("weight")] + "weight_scale_inv" if name.endswith("weight") else None
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        if scale_name is None or scale_name not in src.weight_map:
            raise ValueError(f"{name} is stored in {t.dtype} but has no {scale_name}")
        s = src.get(scale_name).float()
        bn, bk = block
        n, k = t.shape if t.dim() == 2 else (None, None)
        if t.dim() != 2 or tuple(s.shape) != (-(-n // bn), -(-k // bk)):
            raise ValueError(f"{os.path.join(src.path, src.weight_map[scale_name])}: {scale_name} has shape "
                             f"{tuple(s.shape)}; {name} {tuple(t.shape)} with the {bn}x{bk} weight blocks of "
                             f"config.json's quantization_config needs a 2-D weight and [ceil(N/{bn}), "
                             f"ceil(K/{bk})] scales")
        full = s.repeat_interleave(bn, dim=0).repeat_interleave(bk, dim=1)[:n, :k]
        t = t.float() * full
    return t.to(dtype)


FP8_MODES = ("auto", "keep", "weight-only", "dequant")


def fp8_gemm_native(device) -> bool:
    """Whether ``device`` runs FP8 GEMMs in hardware (CUDA, compute capability 8.9 or newer)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 9)


def resolve_fp8_mode(fp8: str, quantization_config, device) -> str:
    """What ``load_pretrained(fp8=…)`` does with E4M3 weights: "keep" (W8A8), "weight-only" (W8A16)
    or "dequant". "auto" keeps the weights of a checkpoint whose config has an FP8
    ``quantization_config`` — W8A8 where the device has FP8 GEMMs, W8A16 elsewhere (exact, and faster
    than emulating FP8 products) — and dequantises otherwise."""
    if fp8 not in FP8_MODES:
        raise ValueError(f"fp8 = {fp8!r}: expected one of {', '.join(FP8_MODES)}")
    if fp8 != "auto":
        return fp8
    if not _is_fp8_config(quantization_config):
        return "dequant"
    return "keep" if fp8_gemm_native(device) else "weight-only"


def _is_fp8_config(qcfg) -> bool:
    return isinstance(qcfg, dict) and qcfg.get("quant_method") == "fp8"


def _scale_name(hf: str) -> str:
    return hf[: -len("weight")] + "weight_scale_inv"


def _fp8_keep_plan(model: nn.Module, plan, src: _TensorSource) -> set[str]:
    """Paths of the Linears / embedding / grouped experts whose checkpoint tensors are all E4M3 with
    their scales and that can run in FP8 (``fp8_inference_candidates`` but kv_b_proj; gate and norms
    are not candidates; with tied word embeddings neither embedding nor head, which share a tensor)."""
    from .fp8.inference import HIGH_PRECISION, fp8_inference_candidates

    hf_of: dict[str, list[str]] = {}
    for key, hf, _, _ in plan:
        hf_of.setdefault(key, []).append(hf)
    available = src.keys()

    def stored_fp8(key: str) -> bool:
        names = hf_of.get(key)
        return bool(names) and all(hf in available and _scale_name(hf) in available
                                   and src.dtype(hf) == "F8_E4M3" for hf in names)

    tied = ("embed_tokens", "lm_head") if model.cfg.tie_word_embeddings else ()
    return {path for path, m in fp8_inference_candidates(model, skip=HIGH_PRECISION + tied).items()
            if all(stored_fp8(f"{path}.{w}") for w in (("w13", "w2") if hasattr(m, "w13") else ("weight",)))}


def load_pretrained(path: str | os.PathLike, device=None, dtype: torch.dtype | None = None,
                    fp8: str = "dequant", prepare=None) -> nn.Module:
    """Load an HF-layout DeepSeek-V3-family checkpoint (BF16/FP32, or FP8 + weight_scale_inv).

    ``fp8`` — what to do with E4M3 weights: "dequant" (default) multiplies them out into `dtype`;
    "keep" keeps them in E4M3 with their 128×128 ``weight_scale_inv`` and runs those Linears and
    routed experts through the block-scaled FP8 GEMM (activations quantised 1×128 on the fly; about
    half the weight memory of BF16; :mod:`dsv3.fp8.inference`, inference only); "weight-only" keeps
    them the same way but dequantises the blocks in each call (W8A16: the outputs of "dequant" with
    the memory of "keep"); "auto" (:func:`resolve_fp8_mode`) is "keep" on a GPU with FP8 GEMMs and
    "weight-only" elsewhere for a checkpoint whose config.json has an FP8 ``quantization_config``,
    else "dequant". A checkpoint without E4M3 tensors loads the same under every mode. Everything that is not kept
    in FP8 is loaded in `dtype` (default float32).

    The MTP layers are loaded when present; when *all* of them are absent (a checkpoint written by
    ``transformers``, which has no MTP), the model is built without MTP. Any other missing or
    unexpected tensor raises ``ValueError`` listing them.

    ``prepare(model)``, when given, runs on the model while it is still on the ``meta`` device, after
    the checkpoint has been checked against the whole model; it may swap modules, e.g.
    ``convert_to_expert_parallel``, whose layers then read only their own experts' tensors.

    The directory's ``generation_config.json`` (:func:`read_generation_config`; None without one) is kept
    as ``model.generation_config``, a dict: ``save_pretrained`` writes its sampling defaults again.
    """
    from .model import Transformer

    if fp8 not in FP8_MODES:
        raise ValueError(f"fp8 = {fp8!r}: expected one of {', '.join(FP8_MODES)}")
    path = os.fspath(path)
    cfg = ModelConfig.from_hf(path)
    generation = read_generation_config(path, cfg)   # kept for save_pretrained (see there)
    qcfg = cfg.quantization_config
    mode = resolve_fp8_mode(fp8, qcfg, device)
    keep = mode in ("keep", "weight-only")
    if keep and qcfg is not None and list(qcfg.get("weight_block_size", [128, 128])) != [128, 128]:
        if fp8 != "auto":
            raise ValueError(f"fp8={fp8!r} needs 128x128 weight blocks; {path} has "
                             f"weight_block_size {qcfg.get('weight_block_size')}")
        keep = False
    block = tuple(qcfg.get("weight_block_size", [128, 128])) if qcfg is not None else (128, 128)
    cfg.quantization_config = None  # set again below when weights stay quantised
    src = _TensorSource(path)
    available = src.keys()
    L = cfg.num_hidden_layers
    has_mtp = any(k.startswith(f"model.layers.{L}.") for k in available)
    if cfg.num_nextn_predict_layers and not has_mtp:
        cfg = cfg.replace(num_nextn_predict_layers=0)
    dtype = dtype or torch.float32
    with torch.device("meta"):
        model = Transformer(cfg)
    plan = list(_hf_names(model))
    needed = {hf for _, hf, _, _ in plan}
    ignorable = set(_mtp_shared_names(cfg))
    missing = sorted(needed - available)
    bias_names = {n for n in missing if n.endswith("e_score_correction_bias")}
    if cfg.topk_method != "noaux_tc":  # V2-style gates have no selection bias
        missing = [n for n in missing if n not in bias_names]
    scale_names = {n for n in available if n.endswith("weight_scale_inv")}
    unexpected = sorted(available - needed - ignorable - scale_names
                        - {n for n in available if n.endswith("rotary_emb.inv_freq")})
    if missing or unexpected:
        msg = [f"checkpoint {path} does not match the model its config.json describes:"]
        if missing:
            msg.append(f"  missing ({len(missing)}): " + ", ".join(missing[:20]) + (" …" if len(missing) > 20 else ""))
        if unexpected:
            msg.append(f"  unexpected ({len(unexpected)}): " + ", ".join(unexpected[:20])
                       + (" …" if len(unexpected) > 20 else ""))
        raise ValueError("\n".join(msg))
    if prepare is not None:
        prepare(model)
        plan = list(_hf_names(model))

    kept = _fp8_keep_plan(model, plan, src) if keep else set()
    kept_keys = set()
    if kept:
        from .fp8.inference import HIGH_PRECISION, convert_to_fp8_inference
        from .fp8.quant import FP8_DTYPE

        convert_to_fp8_inference(model, select=kept.__contains__, skip=HIGH_PRECISION,  # empty (meta)
                                 weight_only=mode == "weight-only")
        kept_keys = {k for k, v in model.state_dict().items() if v.dtype == FP8_DTYPE}
        model.cfg.quantization_config = copy.deepcopy(qcfg) or {
            "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}

    state = {}
    shapes = {k: v for k, v in model.state_dict().items()}
    inter = cfg.moe_intermediate_size
    for key, hf, e, part in plan:
        if hf not in available:  # optional bias of a V2-style gate
            state[key] = torch.zeros(shapes[key].shape, dtype=torch.float32)
            continue
        if key in kept_keys:
            _read_fp8_into(state, shapes, src, key, hf, e, part, inter)
            continue
        keep_fp32 = key.endswith("e_score_correction_bias")
        t = _read(src, hf, torch.float32 if keep_fp32 else dtype, block)
        if e is None:
            if tuple(t.shape) != tuple(shapes[key].shape):
                raise ValueError(f"{hf}: shape {tuple(t.shape)} in the checkpoint, "
                                 f"{tuple(shapes[key].shape)} expected from config.json")
            state[key] = t
            continue
        full = state.get(key)
        if full is None:
            full = state[key] = torch.empty(shapes[key].shape, dtype=dtype)
        target = {"gate_proj": full[e, :inter], "up_proj": full[e, inter:], "down_proj": full[e]}[part]
        if tuple(t.shape) != tuple(target.shape):
            raise ValueError(f"{hf}: shape {tuple(t.shape)}, expected {tuple(target.shape)}")
        target.copy_(t)
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model = model.to_empty(device=device or "cpu")
    if cfg.tie_word_embeddings:  # to_empty() gives every module its own tensor: tie them again
        model.lm_head.weight = model.embed_tokens.weight
    for p in model.parameters():  # weights in `dtype` (kept FP8 ones stay); buffers keep theirs
        if p.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
            p.data = p.data.to(dtype)
    if hasattr(model.embed_tokens, "act_dtype"):   # an embedding kept FP8 returns rows in `dtype`
        model.embed_tokens.act_dtype = model.embed_tokens.act_dtype.to(dtype)
    model.load_state_dict(state, strict=True, assign=False)
    model._freqs = torch.empty(0, dtype=torch.complex64)
    model.generation_config = generation
    return model


def _read_fp8_into(state, shapes, src, key, hf, e, part, inter) -> None:
    """Put the E4M3 tensor `hf` and its scales into `state[key]` / `state[key + "_scale_inv"]`
    (for a stacked expert weight: into expert `e`'s rows of them)."""
    from .fp8.inference import expand_block_scales
    from .fp8.quant import BLOCK, _cdiv

    q, s = src.get(hf), src.get(_scale_name(hf)).float()
    n, k = q.shape if q.dim() == 2 else (None, None)
    if q.dim() != 2 or tuple(s.shape) != (_cdiv(n, BLOCK), _cdiv(k, BLOCK)):
        raise ValueError(f"{hf}: shape {tuple(q.shape)} with {_scale_name(hf)} {tuple(s.shape)}; "
                         f"expected a 2-D weight and [ceil(N/{BLOCK}), ceil(K/{BLOCK})] scales")
    skey = key + "_scale_inv"
    if e is None:
        if tuple(q.shape) != tuple(shapes[key].shape):
            raise ValueError(f"{hf}: shape {tuple(q.shape)} in the checkpoint, "
                             f"{tuple(shapes[key].shape)} expected from config.json")
        state[key], state[skey] = q, s
        return
    full = state.get(key)
    if full is None:
        full = state[key] = torch.empty(shapes[key].shape, dtype=torch.float8_e4m3fn)
        state[skey] = torch.empty(shapes[skey].shape, dtype=torch.float32)
    fs = state[skey]
    target = {"gate_proj": full[e, :inter], "up_proj": full[e, inter:], "down_proj": full[e]}[part]
    if tuple(q.shape) != tuple(target.shape):
        raise ValueError(f"{hf}: shape {tuple(q.shape)}, expected {tuple(target.shape)}")
    target.copy_(q)
    if part == "down_proj":
        fs[e].copy_(s)
        return
    rows = s if fs.shape[1] != 2 * inter else expand_block_scales(s, inter)   # row scales when I % 128
    r = rows.shape[0]
    (fs[e, :r] if part == "gate_proj" else fs[e, r:]).copy_(rows)


# ---------------------------------------------------------------------------------- writing
def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under their HF names (per-expert, MTP at index num_hidden_layers).
    Weights kept in FP8 (``load_pretrained(..., fp8="keep")``) come out dequantised, in the
    dtype of the model's final norm (the activations' dtype)."""
    sd = model.state_dict()
    fp8_keys = [k for k, v in sd.items() if v.dtype == torch.float8_e4m3fn and k + "_scale_inv" in sd]
    if fp8_keys:
        from .fp8.inference import dequantize_fp8

        dtype = model.norm.weight.dtype
        for k in fp8_keys:
            sd[k] = dequantize_fp8(sd[k], sd.pop(k + "_scale_inv"), dtype=dtype)
    out: dict[str, torch.Tensor] = {}
    inter = model.cfg.moe_intermediate_size
    for key, hf, e, part in _hf_names(model):
        t = sd[key]
        if e is not None:
            t = {"gate_proj": t[e, :inter], "up_proj": t[e, inter:], "down_proj": t[e]}[part]
        out[hf] = t.detach().contiguous()
    for name in _mtp_shared_names(model.cfg):
        src = sd["embed_tokens.weight"] if name.endswith("embed_tokens.weight") else sd["lm_head.weight"]
        out[name] = src.detach().clone()  # a stored copy, as in DeepSeek's release
    return out


_EMBEDDING_NAMES = ("embed_tokens.weight", "lm_head.weight", "shared_head.head.weight")


def _fp8_quantisable(name: str, t: torch.Tensor, embeddings: bool = False) -> bool:
    """The official FP8 release quantises every Linear except embedding, head and MoE gate;
    ``embeddings`` quantises the embedding and the head (and the MTP layers' copies of them) too."""
    if t.dim() != 2:
        return False
    if name.endswith(_EMBEDDING_NAMES):
        return embeddings
    return name.endswith(("_proj.weight", "_proj_with_mqa.weight")) and "mlp.gate.weight" not in name


def save_pretrained(model: nn.Module, path: str | os.PathLike, dtype: torch.dtype | None = None,
                    fp8: bool = False, fp8_embeddings: bool = False, max_shard_bytes: int = 4 << 30,
                    generation_config: dict | None = None) -> None:
    """Write ``config.json``, ``generation_config.json`` and safetensors (sharded with an index when large)
    in the HF layout.

    ``generation_config.json`` (:func:`export_generation_config`) gives transformers' ``generate`` the
    model's ``bos_token_id`` and ``eos_token_id`` (a list kept whole), and the sampling defaults
    (temperature, top_p, …) of ``generation_config`` — default: the generation config of the checkpoint the
    model was loaded from (``model.generation_config``); none are made up.

    ``fp8=True`` block-quantises the Linear weights to E4M3 with 128×128 ``weight_scale_inv``
    (as the official DeepSeek-V3 release); the config then carries ``quantization_config``.
    ``fp8_embeddings=True`` (with ``fp8``) quantises the embedding and the output head the same way
    — not done in the release, where they are 0.4% of the bytes, but they are a third of a tiny
    model's; not for tied word embeddings.

    A source config's ``auto_map`` (DeepSeek's points at ``modeling_deepseek.py`` / ``configuration_deepseek.py``)
    is not written: those files are not part of the export, and ``from_pretrained(..., trust_remote_code=True)``
    failed looking for them; without it transformers loads the export with its built-in DeepseekV3 classes,
    the layout written here (every other unknown key is kept).
    """
    from safetensors.torch import save_file

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    tensors = hf_state_dict(model)
    if dtype is not None:
        tensors = {k: (v if k.endswith("e_score_correction_bias") else v.to(dtype)) for k, v in tensors.items()}
    # config.json's torch_dtype: the dtype of the tensors that are not quantised (bfloat16 in DeepSeek's
    # FP8 release), taken before quantising (the embedding may be E4M3 with fp8_embeddings)
    stored_dtype = dtype or tensors["model.embed_tokens.weight"].dtype
    cfg = model.cfg.replace(quantization_config=None)
    if fp8_embeddings and not fp8:
        raise ValueError("fp8_embeddings=True needs fp8=True")
    if fp8_embeddings and cfg.tie_word_embeddings:
        raise ValueError("fp8_embeddings=True is not supported with tie_word_embeddings (one shared table)")
    if fp8:
        from .fp8.quant import quantize_weight

        for name in [n for n, t in tensors.items() if _fp8_quantisable(n, t, fp8_embeddings)]:
            q, s = quantize_weight(tensors[name].float())
            tensors[name] = q.contiguous()
            tensors[name[: -len("weight")] + "weight_scale_inv"] = s.float().contiguous()
        cfg = cfg.replace(quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3",
                                               "quant_method": "fp8", "weight_block_size": [128, 128]})
    tensors = {k: v.cpu().contiguous() for k, v in tensors.items()}
    # shard
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    hf_cfg = cfg.to_hf()
    hf_cfg.pop("auto_map", None)     # remote code this directory does not hold (see above)
    hf_cfg["torch_dtype"] = str(stored_dtype).replace("torch.", "")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2, sort_keys=True)
    if generation_config is None:
        generation_config = getattr(model, "generation_config", None)
    with open(os.path.join(path, GENERATION_CONFIG), "w") as f:
        json.dump(export_generation_config(cfg, generation_config), f, indent=2, sort_keys=True)
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, _SINGLE), metadata=meta)
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, start=1):
        fn = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, fn), metadata=meta)
        for k, v in shard.items():
            weight_map[k] = fn
            total += v.numel() * v.element_size()
    with open(os.path.join(path, _INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
