"""benchmarks/model_time_share.py: the timer counts exactly the nets' forward calls and backward(), and the
benchmark reports a share in (0, 1) from real Neighbor GRPO iterations on a tiny random digits model."""

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "model_time_share.py"
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def share_script():
    spec = importlib.util.spec_from_file_location("model_time_share_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


class Sleepy(torch.nn.Module):
    """A net whose forward takes 20 ms, with a backward that takes 30 ms more."""

    class SlowBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            time.sleep(0.03)
            return grad

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(3))

    def forward(self, x):
        time.sleep(0.02)
        return self.SlowBackward.apply(x * self.weight)


def test_timer_counts_forward_calls_and_backward_only(share_script):
    net, other = Sleepy(), Sleepy()
    timer = share_script.ModelTimer(net, None)
    original_backward = torch.Tensor.backward
    with timer.backward_timed():
        loss = net(torch.ones(3)).sum() + net(torch.ones(3)).sum()
        time.sleep(0.2)  # not model time
        other(torch.ones(3))  # a net the timer does not watch
        loss.backward()
    forward_s, backward_s = timer.reset()
    # two 20 ms forwards, not the 200 ms sleep nor the unwatched net (bounds loose for a busy machine)
    assert 0.04 <= forward_s < 0.2, forward_s
    assert 0.06 <= backward_s < 0.2, backward_s  # two SlowBackward nodes
    assert torch.Tensor.backward is original_backward  # restored
    net(torch.ones(3)).sum().backward()  # outside the context: the forward is timed, the backward is not
    forward_s, backward_s = timer.reset()
    assert forward_s >= 0.02 and backward_s == 0.0
    timer.remove()
    net(torch.ones(3))
    assert timer.reset() == (0.0, 0.0)


def test_share_of_real_iterations_on_a_tiny_model(share_script, tmp_path):
    out = tmp_path / "share.json"
    result = share_script.main(["--archs", "tiny-digits", "--iters", "2", "--warmup", "1", "--reward",
                             "jpeg_compressibility", "--set", "prompts_per_iteration=2", "--set",
                             "neighbor_grpo.group_size=4", "--set", "neighbor_grpo.num_anchors=2", "--set",
                             "neighbor_grpo.rollout_steps=4", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    model = result["models"]["tiny-digits"]
    assert len(model["iterations"]) == 2
    for row in model["iterations"]:
        assert row["forward_s"] > 0 and row["backward_s"] > 0
        assert 0 < row["share"] < 1 and row["forward_s"] + row["backward_s"] < row["iteration_s"]
    assert result["environment"]["command"][0] == "benchmarks/model_time_share.py"
