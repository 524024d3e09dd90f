"""The CPU attention FLOP formula: exact on a lone attention call, and on a tiny FLUX transformer it adds exactly
the attention FLOPs of its joint-attention blocks to FlopCounterMode's count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from neighbor_grpo.plan.attention_flops import cpu_attention_flops, register_cpu_attention_flops

pytestmark = pytest.mark.skipif(not hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"),
                                reason="this torch has no CPU flash-attention op")


def attention_flops(batch, heads, queries, keys, dim, backward=False, enabled=True) -> tuple[int, int]:
    q = torch.randn(batch, heads, queries, dim, requires_grad=backward)
    k, v = torch.randn(batch, heads, keys, dim), torch.randn(batch, heads, keys, dim)
    with cpu_attention_flops(enabled), FlopCounterMode(display=False) as counter:
        out = F.scaled_dot_product_attention(q, k, v)
        forward = counter.get_total_flops()
        if backward:
            out.sum().backward()
    return forward, counter.get_total_flops() - forward


@pytest.mark.parametrize("batch,heads,queries,keys,dim", [(2, 4, 16, 16, 8), (1, 3, 7, 33, 16), (3, 1, 64, 5, 4)])
def test_forward_is_4_b_h_nq_nk_d(batch, heads, queries, keys, dim):
    forward, _ = attention_flops(batch, heads, queries, keys, dim)
    assert forward == 4 * batch * heads * queries * keys * dim


def test_backward_is_two_and_a_half_forwards():
    forward, backward = attention_flops(2, 4, 16, 24, 8, backward=True)
    assert backward == 10 * 2 * 4 * 16 * 24 * 8 == 2.5 * forward


def test_stock_flop_counter_misses_cpu_attention_and_the_registry_is_restored():
    assert attention_flops(2, 4, 16, 16, 8, enabled=False) == (0, 0)
    assert attention_flops(2, 4, 16, 16, 8)[0] > 0
    assert attention_flops(2, 4, 16, 16, 8, enabled=False)[0] == 0


def test_registration_is_idempotent():
    with cpu_attention_flops():
        assert register_cpu_attention_flops() == []  # already there: nothing added, no duplicate error


def test_tiny_flux_forward_gains_exactly_its_attention_flops():
    import diffusers

    from neighbor_grpo.models.architectures import DIFFUSERS_ARCHS

    config = DIFFUSERS_ARCHS["tiny-flux"]["transformer"]
    torch.manual_seed(0)
    net = diffusers.FluxTransformer2DModel(**config)
    batch, image_tokens, text_tokens = 2, 64, 16
    inputs = dict(hidden_states=torch.randn(batch, image_tokens, config["in_channels"]),
                  encoder_hidden_states=torch.randn(batch, text_tokens, config["joint_attention_dim"]),
                  pooled_projections=torch.randn(batch, config["pooled_projection_dim"]),
                  timestep=torch.full((batch,), 0.5), guidance=torch.full((batch,), 3.5),
                  img_ids=torch.zeros(image_tokens, 3), txt_ids=torch.zeros(text_tokens, 3), return_dict=False)
    counts = {}
    for enabled in (False, True):
        with torch.no_grad(), cpu_attention_flops(enabled), FlopCounterMode(display=False) as counter:
            net(**inputs)
        counts[enabled] = counter.get_total_flops()
    blocks = config["num_layers"] + config["num_single_layers"]  # each attends over text + image tokens jointly
    tokens = image_tokens + text_tokens
    attention = blocks * 4 * batch * config["num_attention_heads"] * tokens * tokens * config["attention_head_dim"]
    assert counts[False] > 0
    assert counts[True] - counts[False] == attention
