"""The broadcast causal + padding mask equals transformers' own (vmapped) one, and a model gives the same outputs
with either."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, masking_utils

from shared import attention_masks


def _library(**kwargs):
    return attention_masks._library_sdpa_mask(**kwargs)


@pytest.mark.parametrize("kv_offset", [0, 3])
@pytest.mark.parametrize("q_length", [1, 5, 9])
def test_the_mask_equals_the_librarys(q_length, kv_offset):
    kv_length = 9
    attention_mask = torch.ones(4, kv_length + kv_offset, dtype=torch.long)
    for row, pad in enumerate((0, 2, 5, 1)):  # left padding of different widths
        attention_mask[row, :pad] = 0
    attention_mask[3, -1] = 0  # and a right-padded row
    cache_position = torch.arange(kv_length + kv_offset - q_length, kv_length + kv_offset)
    for mask in (attention_mask, None, torch.ones_like(attention_mask)):
        for skip in (True, False):
            kwargs = dict(
                batch_size=4,
                cache_position=cache_position,
                kv_length=kv_length,
                kv_offset=kv_offset,
                attention_mask=mask,
                allow_is_causal_skip=skip,
            )
            expected, got = _library(**kwargs), attention_masks.causal_padding_mask(**kwargs)
            if expected is None:
                assert got is None
            else:
                assert got.dtype == torch.bool and torch.equal(got, expected)


def test_other_mask_functions_go_to_the_library():
    window = masking_utils.sliding_window_causal_mask_function(3)
    kwargs = dict(batch_size=1, cache_position=torch.arange(6), kv_length=6, mask_function=window, local_size=3)
    expected = _library(**kwargs)
    assert expected is not None and not bool(expected[0, 0, 5, 0])  # the window hides key 0 from query 5
    assert torch.equal(attention_masks.causal_padding_mask(**kwargs), expected)


def test_installed_for_sdpa_and_a_padded_generation_is_unchanged(tiny_policy_dir):
    attention_masks.install()
    assert masking_utils.ALL_MASK_ATTENTION_FUNCTIONS["sdpa"] is attention_masks.causal_padding_mask
    model = AutoModelForCausalLM.from_pretrained(tiny_policy_dir).eval()
    ids = torch.randint(4, 300, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[1, :1] = 0
    with torch.no_grad():
        fast = model(input_ids=ids, attention_mask=mask).logits
        masking_utils.AttentionMaskInterface.register("sdpa", attention_masks._library_sdpa_mask)
        try:
            slow = model(input_ids=ids, attention_mask=mask).logits
        finally:
            attention_masks.install()
    assert torch.equal(fast[mask.bool()], slow[mask.bool()])
