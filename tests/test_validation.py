"""Start-up checks of the backend: every unsupported feature gets a reason a user can act on."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from vllm_kvquant.config import KVQuantConfig  # noqa: E402
from vllm_kvquant.errors import KVQuantConfigError  # noqa: E402
from vllm_kvquant.validation import check_supported, unsupported_reasons  # noqa: E402


def test_supported_configuration_has_no_reasons() -> None:
    assert unsupported_reasons(head_size=128, dtype=torch.bfloat16, kv_cache_dtype="fp8", block_size=16) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(head_size=72), "head size 72 is not supported"),
        (dict(dtype=torch.float32), "model dtype torch.float32 is not supported"),
        (dict(kv_cache_dtype="int8_per_token_head"), "kv_cache_dtype 'int8_per_token_head' is not supported"),
        (dict(kv_cache_dtype="fp8_e5m2"), "leave it 'auto' or set 'fp8'"),
        (dict(block_size=8), "block size 8 is not supported"),
        (dict(use_mla=True), "MLA"),
        (dict(has_sink=True), "attention sinks"),
        (dict(use_sparse=True), "sparse attention"),
        (dict(attn_type="encoder_decoder"), "attention type 'encoder_decoder'"),
        (dict(use_alibi=True), "ALiBi"),
        (dict(use_non_causal=True), "non-causal"),
        (dict(use_dcp=True), "context parallelism"),
    ],
)
def test_each_unsupported_feature_is_named(kwargs: dict, message: str) -> None:
    with pytest.raises(KVQuantConfigError, match="kvquant cannot run layer X: .*" + message.replace("(", r"\(").replace(")", r"\)")):
        check_supported("layer X", **kwargs)


def test_backend_validate_configuration_uses_the_same_reasons() -> None:
    from vllm_kvquant.backend import KVQuantAttentionBackend

    reasons = KVQuantAttentionBackend.validate_configuration(
        head_size=72, dtype=torch.bfloat16, kv_cache_dtype="fp8", block_size=16, use_mla=False, has_sink=False,
        use_sparse=False, use_mm_prefix=False, use_per_head_quant_scales=False, device_capability=None,
        attn_type="decoder",
    )  # fmt: skip
    assert reasons == ["head size 72 is not supported by kvquant (supported: [32, 64, 80, 96, 112, 128, 160, 192, 256])"]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"kvquant": "int8"}, r"additional_config\['kvquant'\] must be an object"),
        ({"kvquant": {"dtype": "fp16"}}, r"\['dtype'\] = 'fp16' is not supported"),
        ({"kvquant": {"fallback": "zero"}}, r"\['fallback'\] = 'zero' is not supported"),
        ({"kvquant": {"scales": 3}}, r"\['scales'\] must be a path string"),
        ({"kvquant": {"calibration": "yes"}}, r"\['calibration'\] must be true or false"),
    ],
)
def test_bad_options_are_refused(raw: dict, message: str) -> None:
    with pytest.raises(KVQuantConfigError, match=message):
        KVQuantConfig.from_additional_config(raw)


def test_default_options() -> None:
    assert KVQuantConfig.from_additional_config(None) == KVQuantConfig()
