"""One mask rule (llava/attention_masks.py) for the CLIP tower's key-padding mask and the decoder loop's causal masks."""

from __future__ import annotations

import torch

from lmms_tokprune.llava.attention_masks import as_attention_mask
from lmms_tokprune.llava.decoder import decoder_mask
from lmms_tokprune.llava.vision import key_padding_mask


def test_sdpa_gets_the_boolean_mask_eager_an_additive_bias():
    allowed = torch.tensor([[[[True, False, True]]]])
    assert as_attention_mask(allowed, "sdpa", torch.float16) is allowed
    bias = as_attention_mask(allowed, "eager", torch.float16)
    assert bias.dtype == torch.float16 and bias.tolist() == [[[[0.0, torch.finfo(torch.float16).min, 0.0]]]]


def test_key_padding_and_decoder_masks_follow_the_one_rule():
    valid = torch.tensor([[False, True, True, True], [True, True, True, True]])
    for impl in ("sdpa", "eager"):
        kp = key_padding_mask(valid, impl, torch.float32)
        assert torch.equal(kp, as_attention_mask(valid[:, None, None, :], impl, torch.float32))
        causal = decoder_mask(valid, 4, impl, torch.float32)
        allowed = valid[:, None, None, :] & torch.ones(4, 4, dtype=torch.bool).tril()
        allowed |= torch.eye(4, dtype=torch.bool)  # a padded query sees itself (finite rows)
        assert torch.equal(causal, as_attention_mask(allowed, impl, torch.float32))
    assert decoder_mask(valid[1:], 4, "sdpa", torch.float32) is None  # plain causality: SDPA's is_causal
