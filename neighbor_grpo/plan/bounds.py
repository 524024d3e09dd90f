"""What one GPU must hold whatever a trace finds, from shapes alone: checked before anything is traced, so that a
size no GPU holds (10^14 samples, 16384 px images) is "does not fit" in a second, never a trace that allocates
petabytes on the CPU or runs for minutes (docs/planning.md)."""

from __future__ import annotations

from neighbor_grpo.plan import memory


class DoesNotFit(ValueError):
    """The shape-only lower bound alone exceeds the GPU: nothing was traced."""

    def __init__(self, terms: dict[str, int], needed: float, available: float):
        self.terms, self.needed, self.available = terms, needed, available
        parts = ", ".join(f"{name} {nbytes / memory.GIB:,.1f} GiB" for name, nbytes in terms.items() if nbytes)
        super().__init__(f"does not fit before any trace: {parts} per GPU (the last two in different phases) alone "
                         f"need {needed / memory.GIB:,.1f} GiB with the margin and allowance, of "
                         f"{available / memory.GIB:,.1f} GiB")


def saved_block_inputs(transformer: dict, height: int, width: int, dtype_bytes: int, tokens: int = 0) -> int:
    """One with-grad sample's saved transformer-block inputs: every block keeps its input (tokens x width) for the
    backward pass, with gradient checkpointing too. Both FLUX (8x VAE, 2x2 packing) and SD3 (8x VAE, patch 2)
    make one token per 16x16 pixels; a video's `tokens` are counted from its latents (Wan: frames x 2x2 patches)."""
    if not transformer or not height:
        return 0
    tokens = tokens or (height // 16) * (width // 16)
    width_ = int(transformer.get("num_attention_heads", 0)) * int(transformer.get("attention_head_dim", 0))
    blocks = int(transformer.get("num_layers", 0)) + int(transformer.get("num_single_layers", 0))
    return tokens * width_ * blocks * dtype_bytes


def shape_lower_bound(algorithm: str, steps: int, samples: int, latent_shape: tuple, height: int, width: int,
                      transformer: dict | None, dtype_bytes: int, frames: int = 1) -> dict[str, int]:
    """Bytes a GPU holds at least: the stored trajectories, the decoded images (diffusers: `height` > 0; a video's
    `frames` each) and one sample's saved block inputs. Each is part of a term of the full plan, so the full plan is
    never below check_lower_bound's sum."""
    video_tokens = latent_shape[1] * (latent_shape[2] // 2) * (latent_shape[3] // 2) if len(latent_shape) == 4 else 0
    return {"stored trajectories": memory.trajectory_bytes(algorithm, steps, samples, latent_shape),
            "decoded images": memory.image_bytes(samples * frames, height, width) if height else 0,
            "one sample's saved block inputs": saved_block_inputs(transformer or {}, height, width, dtype_bytes,
                                                                  video_tokens)}


def check_lower_bound(terms: dict[str, int], memory_bytes: float, margin: float, allowance: float) -> None:
    """The trajectories persist through the iteration; the images (reward phase) and the saved block inputs
    (training phase) belong to different phases, so only the larger of them is added."""
    phase = max(terms["decoded images"], terms["one sample's saved block inputs"])
    needed = (terms["stored trajectories"] + phase) * margin + allowance
    if needed > memory_bytes:
        raise DoesNotFit(terms, needed, memory_bytes)
