"""Spike: can the project's own adapter code (FluxAdapter / SD3Adapter: prompt cache, velocity, VAE decode) run
under fake tensors, so the planner traces exactly what training runs? Tiny configs, nothing downloaded.

Found: constructing the adapter reads values twice: the scheduler's __init__ (`self.sigmas[-1].item()`, fails
when built inside FakeTensorMode) and DiffusersAdapter.__init__'s `_parameters_fingerprint` (fails on meta:
"Cannot copy out of meta tensor"). Both before any tracing. The prompt cache gathers rows by value (`rows.tolist()`), so
prompts are encoded outside the mode (real, small: 512 x 4096 per prompt at FLUX scale). With the fingerprint
skipped (stubbed here, on meta only), the adapter is built on meta outside the mode, its transformer and VAE made
fake, and velocity and decode run under fake tensors.
Run: PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/planner_spike/adapter_fake.py"""
import torch

import neighbor_grpo.models.diffusers_common as diffusers_common
from neighbor_grpo.models.architectures import build_diffusers_adapter
from neighbor_grpo.plan.live_bytes import LiveBytes, fake_mode, tensor_bytes

real_fingerprint = diffusers_common._parameters_fingerprint


def fingerprint_unless_meta(module):
    if any(p.is_meta for p in module.parameters()):
        return torch.zeros(0, 2, dtype=torch.float64)
    return real_fingerprint(module)


for arch in ("tiny-flux", "tiny-sd3"):
    steps = []
    try:
        try:
            build_diffusers_adapter(arch, 64, "meta", torch.float32)
        except NotImplementedError as error:
            steps.append(f"meta build as is FAILS: {str(error).splitlines()[0][:60]}")
        diffusers_common._parameters_fingerprint = fingerprint_unless_meta
        adapter = build_diffusers_adapter(arch, 64, "meta", torch.float32)
        steps.append("meta build with the fingerprint skipped on meta")
        adapter._device = torch.device("cpu")  # built for "meta"; the fake tensors are on cpu
        try:
            with fake_mode():
                adapter.encode_prompts(["a bird"])
        except Exception as error:  # noqa: BLE001
            steps.append(f"prompt cache under fake FAILS {type(error).__name__} (rows.tolist())")
        cond = adapter.encode_prompts(["a cat", "a dog"])  # real: row indices into a real prompt cache
        steps.append("prompts encoded outside the mode")
        mode = fake_mode()
        with mode:
            for component in (adapter.pipeline.transformer, adapter.pipeline.vae):
                component.to_empty(device="cpu")
            x = torch.randn(2, *adapter.latent_shape())
            with LiveBytes(tensor_bytes(adapter.net.parameters())) as tracker:
                v = adapter.velocity(x, torch.tensor(0.5), cond)
                images = adapter.decode(x)
            steps.append(f"fake velocity {tuple(v.shape)}, decode {tuple(images.shape)}, peak {tracker.peak / 2**20:.2f} MiB")
    except Exception as error:  # noqa: BLE001  (a spike: report whatever it raises)
        steps.append(f"FAILS {type(error).__name__}: {str(error).splitlines()[0][:200]}")
    finally:
        diffusers_common._parameters_fingerprint = real_fingerprint
    print(f"{arch}: " + " -> ".join(steps))
