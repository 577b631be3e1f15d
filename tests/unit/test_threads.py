"""How `run` splits the cores between its encoder and its denoisers."""

from __future__ import annotations

import pytest

from sdxl_split.shared.threads import run_threads


@pytest.mark.parametrize("encoder_on_cpu, denoisers, on_cpu, cores, expected", [
    (True, 1, True, 2, (1, 2)),     # CPU denoiser: every core (the encoder is soon done)
    (True, 2, True, 8, (1, 4)),     # two CPU denoisers split them
    (True, 3, True, 2, (1, 1)),     # never zero threads
    (True, 1, False, 16, (15, 1)),  # GPU denoiser: one thread; the CPU encoder takes the rest
    (True, 4, False, 4, (1, 1)),
    (False, 1, False, 8, (1, 1)),   # encoder on a GPU too
])
def test_run_gives_the_long_running_side_the_cores(encoder_on_cpu, denoisers, on_cpu, cores, expected) -> None:
    assert run_threads(encoder_on_cpu, denoisers, on_cpu, cores) == expected
