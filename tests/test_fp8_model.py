"""convert_to_fp8 on the tiny model: what is converted, what is kept, and that it trains."""

import copy

import pytest
import torch
from torch import nn

from dsv3 import ModelConfig, Transformer
from dsv3 import fp8
from dsv3.fp8.model import convert_to_fp8, fp8_summary


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny")
    return cfg, Transformer(cfg)


def test_convert_swaps_linears_and_experts_keeps_head_gate_embedding(tiny):
    cfg, ref = tiny
    model = copy.deepcopy(ref)
    params_before = {n: p for n, p in model.named_parameters()}
    convert_to_fp8(model)
    s = fp8_summary(model)
    assert s["high_precision_linear"] == 1 and type(model.lm_head) is nn.Linear
    assert s["fp8_linear"] > 0 and s["fp8_experts"] == sum(
        1 for m in ref.modules() if hasattr(m, "w13"))
    assert isinstance(model.embed_tokens, nn.Embedding)
    # parameters are shared, not copied: same objects, same names, same state_dict
    after = dict(model.named_parameters())
    assert after.keys() == params_before.keys()
    assert all(after[n] is params_before[n] for n in after)
    assert model.state_dict().keys() == ref.state_dict().keys()
    o_proj = [m for n, m in model.named_modules() if n.endswith("o_proj")]
    assert o_proj and all(isinstance(m, fp8.FP8Linear) and m.pow2_scale for m in o_proj)
    assert convert_to_fp8(model) is model and fp8_summary(model) == s     # idempotent


@pytest.mark.parametrize("bf16_autocast", [False, True], ids=["fp8", "fp8+bf16-autocast"])
def test_fp8_model_trains_like_fp32(tiny, bf16_autocast):
    # with bf16_autocast, as --precision fp8 trains: FP8 GEMMs, everything else in BF16
    cfg, ref = tiny
    tok = torch.randint(0, cfg.vocab_size, (4, 33), generator=torch.Generator().manual_seed(1))
    losses = {}
    for precision in ("fp32", "fp8"):
        model = copy.deepcopy(ref)
        if precision == "fp8":
            convert_to_fp8(model)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        curve = []
        for _ in range(12):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_autocast and precision == "fp8"):
                logits = model(tok[:, :-1])
            loss = nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size).float(),
                                               tok[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        losses[precision] = curve
    f32, f8 = losses["fp32"], losses["fp8"]
    assert f8[-1] < f8[0] - 1.0                       # it learns (memorises the batch)
    rel = [abs(a - b) / a for a, b in zip(f32, f8)]
    assert max(rel) < 0.05, rel


def test_fp8_layers_under_bf16_autocast_take_bf16_inputs_and_keep_their_fp32_maths():
    # --precision fp8 runs the model under BF16 autocast: an FP8 layer then takes its input in BF16 (as
    # nn.Linear would), and its own maths (quantisers, the torch backend's per-group FP32 products) is
    # untouched by autocast: bitwise the same layer applied to the BF16 input outside autocast.
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(48, 256, generator=g) * 3).requires_grad_(True)
    dy = torch.randn(48, 160, generator=g).to(torch.bfloat16)
    lin = fp8.FP8Linear(256, 160)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
    assert y.dtype == torch.bfloat16
    y.backward(dy)
    gx, gw = x.grad.clone(), lin.weight.grad.clone()
    lin.weight.grad = None
    xb = x.detach().to(torch.bfloat16).requires_grad_(True)
    y2 = lin(xb)
    y2.backward(dy)
    assert torch.equal(y, y2) and torch.equal(gx, xb.grad.float()) and torch.equal(gw, lin.weight.grad)

    w = torch.randn(3, 160, 256, generator=g, requires_grad=True)
    counts = [20, 0, 28]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = fp8.fp8_grouped_linear(x, w, counts=counts)
    z2 = fp8.fp8_grouped_linear(x.detach().to(torch.bfloat16), w, counts=counts)
    assert z.dtype == torch.bfloat16 and torch.equal(z, z2)
