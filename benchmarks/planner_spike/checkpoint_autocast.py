"""Spike: gradient checkpointing and CPU bf16 autocast inside a fake trace: does the fake peak still equal the real
run's, and what does each save? Run: PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/planner_spike/checkpoint_autocast.py"""
import diffusers
import peft
import torch

from neighbor_grpo.plan.live_bytes import LiveBytes, fake_mode, tensor_bytes, to_fake

CONFIG = dict(in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=32, num_attention_heads=4,
              joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(8, 12, 12))
LORA = dict(r=8, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
BATCH, IMAGE, TEXT = 4, 1024, 64


def model(device, checkpointing):
    torch.manual_seed(0)
    with torch.device(device):
        net = diffusers.FluxTransformer2DModel(**CONFIG)
        if checkpointing:
            net.enable_gradient_checkpointing()
        return peft.get_peft_model(net, peft.LoraConfig(**LORA))


def peak(net, autocast):
    net.train()
    tracker = LiveBytes(tensor_bytes(net.parameters()))
    with tracker, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = net(hidden_states=torch.randn(BATCH, IMAGE, 16), encoder_hidden_states=torch.randn(BATCH, TEXT, 64),
                  pooled_projections=torch.randn(BATCH, 32), timestep=torch.full((BATCH,), 0.5),
                  img_ids=torch.zeros(IMAGE, 3), txt_ids=torch.zeros(TEXT, 3), guidance=torch.full((BATCH,), 3.5),
                  return_dict=False)[0]
        out.float().square().mean().backward()
    return tracker.peak / 2**20


for checkpointing in (False, True):
    for autocast in (False, True):
        mode = fake_mode()
        fake = to_fake(model("meta", checkpointing), mode)
        try:
            with mode:
                fake_peak = f"{peak(fake, autocast):.1f} MiB"
        except Exception as error:  # noqa: BLE001  (a spike: report whatever it raises)
            fake_peak = f"FAILS {type(error).__name__}: {str(error).splitlines()[0][:120]}"
        print(f"checkpointing={checkpointing!s:5} autocast bf16={autocast!s:5}: fake {fake_peak}, "
              f"real {peak(model('cpu', checkpointing), autocast):.1f} MiB")
