"""The accuracy benchmark's outlier transform (benchmarks/accuracy/outliers.py): same function, real outliers.

A tiny GQA Llama (4 query / 2 KV heads) in float64: the outlier model's logits equal the original's to
float64 rounding for any factors, and bit for bit for powers of two (also in bf16, which is what makes
the BF16 rows of both models identical); the chosen k_proj channels really are alpha times larger.
A negative control (one channel of a RoPE pair scaled alone) shows the check can fail. Bad plans and
configs are refused with messages naming layer, head, channel or tensor.
"""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.accuracy.outliers import (
    AttentionShape,
    HeadOutliers,
    OutlierSettings,
    apply_outliers,
    make_outlier_checkpoint,
    plan_outliers,
    rope_pair,
)

transformers = pytest.importorskip("transformers")

HEAD_DIM = 16


def _config(**kw):
    base = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=HEAD_DIM, max_position_embeddings=64,
                initializer_range=0.2)  # fmt: skip  # peaked attention: a wrong transform shows
    base.update(kw)
    return transformers.LlamaConfig(**base)


def _model(dtype=torch.float64, **kw):
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(_config(**kw)).to(dtype).eval()


def _logits(model, state_dict, x):
    m = transformers.LlamaForCausalLM(model.config).to(next(model.parameters()).dtype).eval()
    m.load_state_dict(state_dict)
    with torch.no_grad():
        return m(x).logits


def _plan(alphas=(8.0, 32.0), betas=(4.0,), v_fraction=1.0):
    return plan_outliers(2, 2, HEAD_DIM, OutlierSettings(k_alphas=alphas, v_betas=betas, v_head_fraction=v_fraction))


def test_rope_pairs_are_half_a_head_apart():
    # HF rotate_half and vLLM's neox-style rotary rotate (i, i + d/2) together
    assert rope_pair(0, 64) == (0, 32) and rope_pair(31, 64) == (31, 63)
    with pytest.raises(ValueError, match="RoPE pair 32 does not exist for head_dim 64"):
        rope_pair(32, 64)


def test_plan_is_seeded_paired_and_low_frequency():
    plan = _plan()
    assert plan == _plan()  # deterministic
    assert len(plan) == 4
    half = HEAD_DIM // 2
    for h in plan:
        assert h.k_channels and len(h.k_channels) % 2 == 0
        for c in h.k_channels:
            assert (c + half) % HEAD_DIM in h.k_channels
            assert c % half >= half - max(1, round(half * 0.25))  # lowest-frequency quarter of the pairs
        assert h.alpha in (8.0, 32.0) and h.beta == 4.0 and len(h.v_channels) == 1
    other = plan_outliers(2, 2, HEAD_DIM, OutlierSettings(seed=1))
    assert other != plan_outliers(2, 2, HEAD_DIM, OutlierSettings(seed=0))


@pytest.mark.parametrize("alphas,betas", [((8.0, 32.0), (4.0,)), ((10.0, 37.5), (3.0, 5.5))])
def test_same_function_in_float64(alphas, betas):
    model = _model()
    shape = AttentionShape.from_hf_config(model.config.to_dict())
    new = apply_outliers(model.state_dict(), shape, _plan(alphas, betas))
    x = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    ref, got = _logits(model, model.state_dict(), x), _logits(model, new, x)
    assert ref.abs().max() > 0.1
    err = (got - ref).abs().max().item()
    if all(float(v).is_integer() and (int(v) & (int(v) - 1)) == 0 for v in (*alphas, *betas)):
        assert err == 0.0  # powers of two: every product is scaled exactly
    else:
        assert err < 1e-10


def test_powers_of_two_are_bit_identical_in_bf16():
    model = _model(torch.bfloat16)
    shape = AttentionShape.from_hf_config(model.config.to_dict())
    new = apply_outliers(model.state_dict(), shape, _plan())
    x = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(2))
    assert torch.equal(_logits(model, model.state_dict(), x), _logits(model, new, x))


def test_k_and_v_channels_really_grow():
    model = _model()
    shape = AttentionShape.from_hf_config(model.config.to_dict())
    plan = _plan()
    new = apply_outliers(model.state_dict(), shape, plan)
    h = plan[0]  # layer 0, KV head 0
    old_k, new_k = model.state_dict()["model.layers.0.self_attn.k_proj.weight"], new["model.layers.0.self_attn.k_proj.weight"]
    ratio = (new_k.norm(dim=1) / old_k.norm(dim=1)).view(2, HEAD_DIM)
    expected = torch.ones(2, HEAD_DIM, dtype=torch.float64)
    expected[0, list(h.k_channels)] = h.alpha
    expected[1, list(plan[1].k_channels)] = plan[1].alpha
    assert torch.allclose(ratio, expected)
    old_q, new_q = model.state_dict()["model.layers.0.self_attn.q_proj.weight"], new["model.layers.0.self_attn.q_proj.weight"]
    q_ratio = (new_q.norm(dim=1) / old_q.norm(dim=1)).view(4, HEAD_DIM)
    for qh in (0, 1):  # the query heads of KV head 0 (GQA group of 2)
        assert torch.allclose(q_ratio[qh, list(h.k_channels)], torch.full((len(h.k_channels),), 1 / h.alpha, dtype=torch.float64))
    old_v, new_v = model.state_dict()["model.layers.0.self_attn.v_proj.weight"], new["model.layers.0.self_attn.v_proj.weight"]
    assert torch.allclose(new_v[h.v_channels[0]], old_v[h.v_channels[0]] * h.beta)
    old_o, new_o = model.state_dict()["model.layers.0.self_attn.o_proj.weight"], new["model.layers.0.self_attn.o_proj.weight"]
    for qh in (0, 1):
        col = qh * HEAD_DIM + h.v_channels[0]
        assert torch.allclose(new_o[:, col], old_o[:, col] / h.beta)


def test_negative_control_one_channel_of_a_pair_changes_the_function():
    """Scaling channel i without its RoPE partner does not commute with the rotation: logits move."""
    model = _model()
    sd = dict(model.state_dict())
    k, q = "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.q_proj.weight"
    sd[k] = sd[k].clone()
    sd[q] = sd[q].clone()
    sd[k][7] *= 16.0
    sd[q][[7, HEAD_DIM + 7]] /= 16.0
    x = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    assert (_logits(model, sd, x) - _logits(model, model.state_dict(), x)).abs().max() > 1e-2


def test_bad_plans_and_configs_are_refused():
    model = _model()
    shape = AttentionShape.from_hf_config(model.config.to_dict())
    with pytest.raises(ValueError, match=r"layer 1 KV head 0: K channel 3 without its RoPE partner 11"):
        apply_outliers(model.state_dict(), shape, [HeadOutliers(1, 0, (3,), 8.0)])
    with pytest.raises(ValueError, match=r"layer 0 KV head 1: channels \[16\] outside head_dim 16"):
        apply_outliers(model.state_dict(), shape, [HeadOutliers(0, 1, (), 1.0, (16,), 4.0)])
    with pytest.raises(ValueError, match="layer 5 KV head 0, outside the model"):
        apply_outliers(model.state_dict(), shape, [HeadOutliers(5, 0, (0, 8), 8.0)])
    bad = dict(model.state_dict())
    bad["model.layers.0.self_attn.k_proj.weight"] = bad["model.layers.0.self_attn.k_proj.weight"][:16]
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.k_proj.weight: dimension 0 is 16, expected 32"):
        apply_outliers(bad, shape, [HeadOutliers(0, 0, (0, 8), 8.0)])
    cfg = model.config.to_dict()
    with pytest.raises(ValueError, match="partial_rotary_factor 0.5"):
        AttentionShape.from_hf_config({**cfg, "partial_rotary_factor": 0.5}, "x/config.json")
    with pytest.raises(ValueError, match=r"x/config.json: model_type 'qwen3' is not 'llama'"):
        AttentionShape.from_hf_config({**cfg, "model_type": "qwen3"}, "x/config.json")
    with pytest.raises(ValueError, match=r"k_alphas has 0.0; factors must be finite and > 0"):
        OutlierSettings(k_alphas=(0.0,)).validate()


def test_checkpoint_round_trip(tmp_path):
    model = _model(torch.bfloat16)
    src = tmp_path / "plain"
    model.save_pretrained(src, safe_serialization=True)
    (src / "kvquant_scales.json").write_text("{}")  # a sidecar of the plain model must not be copied
    info = make_outlier_checkpoint(src, tmp_path / "outlier", OutlierSettings())
    assert info["exact_in_floating_point"] is True and len(info["plan"]) == 4
    assert json.loads((tmp_path / "outlier" / "outlier_plan.json").read_text())["plan"] == info["plan"]
    assert not (tmp_path / "outlier" / "kvquant_scales.json").exists()
    # both loaded from disk (an in-memory .to(bf16) model also casts RoPE's inv_freq buffer to bf16)
    plain = transformers.LlamaForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()
    out = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "outlier", dtype=torch.bfloat16).eval()
    x = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(out(x).logits, plain(x).logits)
    assert not torch.equal(out.model.layers[0].self_attn.k_proj.weight, plain.model.layers[0].self_attn.k_proj.weight)
