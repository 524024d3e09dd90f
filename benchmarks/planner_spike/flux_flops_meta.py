"""Spike: FLOPs of one FLUX.1-dev transformer forward at 512, 720 and 1024 px, counted by FlopCounterMode without
memory or weights, two ways: on the meta device (SDPA takes the math path there: bmm + softmax, which torch
counts), and under FakeTensorMode on "cpu" (SDPA dispatches to the CPU flash op, 0 FLOPs unless our formula is
registered). Run: PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/planner_spike/flux_flops_meta.py"""
import time

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from neighbor_grpo.plan.architectures import build_on_meta
from neighbor_grpo.plan.attention_flops import cpu_attention_flops

meta_net = build_on_meta("flux-dev-transformer")
fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
fake_net = build_on_meta("flux-dev-transformer")  # built outside the mode: meta tensors made inside it fail to_empty
with fake_mode:
    fake_net = fake_net.to_empty(device="cpu")


def inputs(tokens, text, device):
    with torch.device(device):
        return dict(hidden_states=torch.empty(1, tokens, 64, dtype=torch.bfloat16),
                    encoder_hidden_states=torch.empty(1, text, 4096, dtype=torch.bfloat16),
                    pooled_projections=torch.empty(1, 768, dtype=torch.bfloat16),
                    timestep=torch.empty(1, dtype=torch.bfloat16), guidance=torch.empty(1, dtype=torch.bfloat16),
                    img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(text, 3), return_dict=False)


def flops(net, args, enabled):
    with torch.no_grad(), cpu_attention_flops(enabled), FlopCounterMode(display=False) as counter:
        net(**args)
    return counter.get_total_flops()


for pixels in (512, 720, 1024):
    tokens, text = (pixels // 16) ** 2, 512  # VAE /8, then 2x2 patches packed into the 64 channels
    start = time.perf_counter()
    meta = flops(meta_net, inputs(tokens, text, "meta"), enabled=False)
    with fake_mode:
        args = inputs(tokens, text, "cpu")
        fake_without, fake_with = flops(fake_net, args, False), flops(fake_net, args, True)
    analytic = 57 * 4 * 24 * (tokens + text) ** 2 * 128  # 19 double + 38 single blocks, joint attention
    print(f"{pixels} px ({tokens} image + {text} text tokens) per sample-forward: meta {meta / 1e12:.3f} TFLOP; "
          f"fake cpu {fake_without / 1e12:.3f} without the formula, {fake_with / 1e12:.3f} with; "
          f"attention share {1 - fake_without / fake_with:.1%} (analytic {analytic / fake_with:.1%}); "
          f"{time.perf_counter() - start:.1f} s")
