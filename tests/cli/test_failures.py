"""One line per failure: the exit status and message of each class of error."""

import errno

from neighbor_grpo.config.train_config import ConfigError
from neighbor_grpo.cli.failures import one_line
from neighbor_grpo.runs.ownership import OwnershipError


def test_an_os_error_during_the_run_is_one_line():
    code, message = one_line(OSError(errno.ENOSPC, "No space left on device", "/runs/r/metrics.csv"))
    assert code == 1 and message == "cannot use '/runs/r/metrics.csv': No space left on device (the disk is full)"


def test_bad_input_exits_2_and_failures_of_the_run_exit_1():
    assert one_line(ConfigError("optim.lr: expected a learning rate > 0, got 0.0")) == (
        2, "optim.lr: expected a learning rate > 0, got 0.0")
    assert one_line(OwnershipError("--out 'x' is a file"))[0] == 2
    assert one_line(FloatingPointError("reward 'r' returned 2 non-finite score(s)"))[0] == 1
    assert one_line(OSError(errno.EROFS, "Read-only file system", "/ro/run"))[1].endswith("(a read-only file system)")


def test_an_unexpected_error_points_at_debug_on_one_line():
    code, message = one_line(KeyError("multi\nline"))
    assert code == 1 and "\n" not in message and message.startswith("unexpected KeyError") and "--debug" in message
