"""Real CLIP BPE tokenizers for SDXL, built from the vocabulary shipped as package data."""

from __future__ import annotations

import gzip
import json
from importlib import resources
from pathlib import Path

from transformers import CLIPTokenizer

from sdxl_split.shared.quiet import quiet_loaded

# Imported diffusers/transformers just now: their loading bars go off if the command asked (shared.quiet).
quiet_loaded()

# CLIP's vocabulary is the 256 byte symbols, the same with an end-of-word mark, then the merges,
# then the two special tokens; 49408 entries in all (see openai/CLIP simple_tokenizer.py).
_N_MERGES = 49152 - 256 - 2
MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> list[str]:
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def _read_merges() -> list[str]:
    blob = resources.files("sdxl_split.shared").joinpath("clip_vocab/bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.decompress(blob.read_bytes()).decode("utf-8").split("\n")
    return lines[1 : _N_MERGES + 1]


def write_tokenizer_files(directory: Path) -> tuple[Path, Path]:
    """Write vocab.json and merges.txt in the layout Hugging Face's CLIPTokenizer reads."""
    directory.mkdir(parents=True, exist_ok=True)
    merges = _read_merges()
    symbols = _bytes_to_unicode()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    vocab_path, merges_path = directory / "vocab.json", directory / "merges.txt"
    vocab_path.write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False), "utf-8")
    merges_path.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", "utf-8")
    return vocab_path, merges_path


def write_sdxl_tokenizer(directory: Path, pad_token: str) -> Path:
    """Write a tokenizer folder laid out as in stabilityai/stable-diffusion-xl-base-1.0."""
    write_tokenizer_files(directory)
    config = {
        "add_prefix_space": False,
        "bos_token": BOS,
        "do_lower_case": True,
        "eos_token": EOS,
        "errors": "replace",
        "model_max_length": MAX_LENGTH,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": EOS,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": pad_token, "unk_token": EOS}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2, sort_keys=True) + "\n")
    return directory


def write_sdxl_tokenizers(model_dir: Path) -> None:
    """SDXL base's two tokenizers: `tokenizer` pads with <|endoftext|>, `tokenizer_2` with '!' (id 0)."""
    write_sdxl_tokenizer(model_dir / "tokenizer", pad_token=EOS)
    write_sdxl_tokenizer(model_dir / "tokenizer_2", pad_token="!")


def load_tokenizer(directory: Path) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(str(directory))
