"""Spike: what works under fake tensors on torch CPU (no download, a few seconds).

1. peft's get_peft_model under FakeTensorMode, vs meta build -> LoRA -> to_empty under FakeTensorMode.
2. FlopCounterMode on CPU scaled-dot-product attention.
3. A forward + backward of a small FLUX transformer with LoRA, traced under FakeTensorMode at real shapes, its peak
   live bytes (neighbor_grpo.plan.live_bytes.LiveBytes: storages tracked by weakref) against the same tracker and torch.profiler on a real CPU run.
Run: PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/planner_spike/fake_trace.py
"""
import diffusers
import peft
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from neighbor_grpo.plan.live_bytes import LiveBytes

CONFIG = dict(in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=32, num_attention_heads=4,
              joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(8, 12, 12))
BATCH, IMAGE_TOKENS, TEXT_TOKENS = 4, 1024, 64
LORA = peft.LoraConfig(r=8, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])


def inputs():
    return dict(hidden_states=torch.randn(BATCH, IMAGE_TOKENS, 16), encoder_hidden_states=torch.randn(BATCH, TEXT_TOKENS, 64),
                pooled_projections=torch.randn(BATCH, 32), timestep=torch.full((BATCH,), 0.5),
                img_ids=torch.zeros(IMAGE_TOKENS, 3), txt_ids=torch.zeros(TEXT_TOKENS, 3), guidance=torch.full((BATCH,), 3.5))


def step(model, tracker):
    with tracker:
        out = model(**inputs(), return_dict=False)[0]
        out.square().mean().backward()
    return tracker.peak


def param_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


# 1. peft under FakeTensorMode
torch.manual_seed(0)
try:
    with FakeTensorMode():
        peft.get_peft_model(diffusers.FluxTransformer2DModel(**CONFIG), LORA)
    print("get_peft_model under FakeTensorMode: works")
except Exception as error:  # noqa: BLE001  (a spike: report whatever it raises)
    print(f"get_peft_model under FakeTensorMode: FAILS: {type(error).__name__}: {str(error).splitlines()[0][:160]}")
with torch.device("meta"):
    meta_model = peft.get_peft_model(diffusers.FluxTransformer2DModel(**CONFIG), LORA)
fake_mode = FakeTensorMode(allow_non_fake_inputs=True)  # to_empty reads the meta parameters
with fake_mode:
    fake_model = meta_model.to_empty(device="cpu")
kinds = {type(p).__name__ for p in fake_model.parameters()}
print(f"meta -> get_peft_model -> to_empty under FakeTensorMode: parameter types {kinds}, "
      f"trainable {sum(p.numel() for p in fake_model.parameters() if p.requires_grad)}")

# 2. FlopCounterMode on CPU SDPA
q = torch.randn(2, 4, 256, 32)
with FlopCounterMode(display=False) as counter:
    F.scaled_dot_product_attention(q, q, q)
print(f"FlopCounterMode on CPU SDPA without a formula: {counter.get_total_flops()} FLOPs "
      f"(expected 4*B*H*N*N*d = {4 * 2 * 4 * 256 * 256 * 32}); ops: {list(counter.get_flop_counts()['Global'])}")

# 3. fake trace vs real run
with fake_mode:
    fake_peak = step(fake_model, LiveBytes(param_bytes(fake_model)))
torch.manual_seed(0)
real_model = peft.get_peft_model(diffusers.FluxTransformer2DModel(**CONFIG), LORA)
real_peak = step(real_model, LiveBytes(param_bytes(real_model)))
real_model.zero_grad(set_to_none=True)
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
    out = real_model(**inputs(), return_dict=False)[0]
    out.square().mean().backward()
live = peak = 0
events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
for event in events:  # allocations (+) and frees (-) in time order; params existed before
    live += event.self_cpu_memory_usage
    peak = max(peak, live)
print(f"peak live bytes: fake trace {fake_peak / 2**20:.1f} MiB, same tracker on a real CPU run "
      f"{real_peak / 2**20:.1f} MiB, torch.profiler memory events {(peak + param_bytes(real_model)) / 2**20:.1f} MiB "
      f"(params {param_bytes(real_model) / 2**20:.1f} MiB)")
