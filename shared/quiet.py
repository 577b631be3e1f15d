"""Keeps third-party chatter (download bars, deprecation notes) out of our one-line-per-event output."""

from __future__ import annotations

import logging
import os
import warnings


def quiet_libraries(verbosity: int) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if verbosity >= 2:
        return
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    for name in ("huggingface_hub", "accelerate", "torch._dynamo", "torch._inductor"):
        logging.getLogger(name).setLevel(logging.ERROR)
