"""The encoder at full size (random weights) on long prompts: prompts/s for `plain` (truncated at 77 tokens, as
diffusers does) against `a1111` and `comfy` (75-token chunks, every token encoded), and the chunks each needs.

Run through `python benchmarks/split_overhead.py --syntax-full`. Uses `sdxl-random` from the cache dir
(SDXL_SPLIT_CACHE, else the user cache), building it on first use: about 6.5 GB, a minute or so.
"""

from __future__ import annotations

import argparse
import datetime as dt
import time

import torch

# About 125 CLIP tokens each: two chunks under a1111; plain cuts the last 47.
SUBJECTS = ("an old lighthouse", "a red bicycle", "a mountain lake", "a market street")
DETAIL = ("on a rocky coast at dusk, (dramatic clouds:1.3), warm light from the windows, [blurry], waves breaking "
          "on the rocks, seagulls, a narrow path with a wooden fence, wildflowers in the foreground, fishing boats "
          "in the distance, film grain, 35mm photograph, shallow depth of field, golden hour, highly detailed, "
          "masterpiece, (sharp focus:1.2), soft shadows, rich colours, a quiet mood, wet stones reflecting the sky, "
          "a lone figure in a yellow raincoat, mist over the water, distant hills, a faint rainbow")
PROMPTS = [f"{subject} {DETAIL}, variation {n}" for subject in SUBJECTS for n in range(2)]


def syntax_full(args: argparse.Namespace) -> tuple[dict, str, str]:
    import os

    from sdxl_split.encoder_service.text_side import TextSide
    from sdxl_split.shared.models.resolve import resolve_model
    from sdxl_split.shared.prompts import PromptEntry
    from sdxl_split.shared.settings import cache_dir_from

    source = resolve_model("sdxl-random", cache_dir_from(os.environ.get("SDXL_SPLIT_CACHE")), announce=print)
    side = TextSide(source, "cpu", "fp32")
    torch.set_num_threads(os.cpu_count() or 1)
    entries = [PromptEntry(line=n + 1, prompt=text, negative_prompt="blurry, low quality")
               for n, text in enumerate(PROMPTS)]
    tokens = len(side.pipe.tokenizer(PROMPTS[0]).input_ids)
    side.encode(entries[:1], None)  # warm-up: first-call allocations
    side.encode_compiled(entries[0], None, "a1111")
    rows = {}
    for syntax in ("plain", "a1111", "comfy"):
        side._negatives.clear()  # the shared negative is encoded once per run, as in a real one
        started = time.perf_counter()
        if syntax == "plain":
            encoded = [side.encode([entry], None)[0] for entry in entries]
        else:
            encoded = [side.encode_compiled(entry, None, syntax) for entry in entries]
        seconds = time.perf_counter() - started
        shape = list(encoded[0].tensors["prompt_embeds"].shape)
        rows[syntax] = {"prompts_per_s": len(entries) / seconds, "seconds": seconds, "prompt_embeds": shape,
                        "chunks": shape[1] // 77}
    payload = {"date": dt.date.today().isoformat(), "model": source.description, "prompts": len(entries),
               "clip_tokens_per_prompt": tokens, "threads": torch.get_num_threads(), "rows": rows}
    lines = [f"# Encoder on long prompts at full size, {payload['date']}", "",
             f"- {source.description}; fp32 on CPU, {payload['threads']} threads; {len(entries)} prompts of "
             f"{tokens} CLIP tokens (with BOS/EOS), batch 1, sharing the negative 'blurry, low quality'",
             "- plain truncates at 77 tokens (diffusers' encode_prompt); a1111 and comfy encode every token in "
             "75-token chunks and pad the negative to the same number of chunks", "",
             "| syntax | prompts/s | s for all | prompt_embeds | chunks |", "| --- | ---: | ---: | --- | ---: |"]
    lines += [f"| {name} | {row['prompts_per_s']:.2f} | {row['seconds']:.1f} | {row['prompt_embeds']} | "
              f"{row['chunks']} |" for name, row in rows.items()]
    ratio = rows["plain"]["prompts_per_s"] / rows["a1111"]["prompts_per_s"]
    lines += ["", f"- a1111 costs {ratio:.2f}x plain per prompt: two chunks are two forward passes of each encoder, "
              "and the padded negative is encoded once"]
    return payload, "\n".join(lines) + "\n", f"prompt-syntax-full-{payload['date']}"
