"""Keeps third-party chatter (download bars, deprecation notes) out of our one-line-per-event output, without
importing diffusers or transformers to say so: importing diffusers pulls in torch._dynamo, seconds that a command
which never loads a model (or `run`'s parent, whose children do the loading) should not pay."""

from __future__ import annotations

import logging
import os
import sys
import warnings

# The verbosity a command asked for; None until one has.
_verbosity: int | None = None


def quiet_libraries(verbosity: int) -> None:
    global _verbosity
    _verbosity = verbosity
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if verbosity >= 2:
        return
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    # Read by each library when it sets up its logger, i.e. whenever it is first imported.
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # torchao, imported by diffusers and transformers whenever it is installed, warns about each of its optional
    # CUDA extensions that this machine cannot load, and registers enums that torch then calls deprecated.
    for name in ("huggingface_hub", "accelerate", "torch._dynamo", "torch._inductor", "torchao",
                 "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    quiet_loaded()


def quiet_loaded() -> None:
    """Turn off the loading bars of diffusers and transformers if they are imported (no environment variable
    reaches them); the modules that import them call this once they have."""
    if _verbosity is None or _verbosity >= 2:
        return
    if "diffusers" in sys.modules:
        import diffusers.utils.logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()
    if "transformers" in sys.modules:
        import transformers.utils.logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
