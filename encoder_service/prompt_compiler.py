"""Prompts written for A1111 or ComfyUI (weights, BREAK, past 77 tokens) compiled into SDXL's four plain tensors.

Each encoder (CLIP-L and bigG) encodes the prompt's 77-token chunks one by one, exactly as diffusers encodes one
prompt (hidden_states[-2], or the --clip-skip layer for the positive); the chunks' hidden states are concatenated
into [1, 77*k, 2048] and the pooled embedding is bigG's for the first chunk. Weights then act per chunk:
- a1111 ("Original" emphasis): each token's embedding is multiplied by its weight, and the chunk is rescaled to the
  mean it had before;
- comfy: each weighted token is moved from the empty prompt's embedding towards its own, e + (z - e) * w.
A prompt with no syntax and at most 75 tokens therefore compiles bit for bit to what encode_prompt gives. A
positive and a negative of different lengths are padded with chunks of the empty prompt, as A1111 does. Changing
what this module computes means bumping shared.embeddings.CHUNK_COMPILER_VERSION, which is in every cache key.
"""

from __future__ import annotations

import torch

from sdxl_split.encoder_service.prompt_chunks import Chunk, Chunker, empty_chunk, layout
from sdxl_split.shared.embeddings import CHUNK_LEN, MAX_CHUNKS


class PromptTooLong(ValueError):
    """More chunks than a record may hold."""


class PromptCompiler:
    def __init__(self, pipe, device: torch.device) -> None:
        self.device = device
        self.encoders = [(Chunker(pipe.tokenizer), pipe.text_encoder), (Chunker(pipe.tokenizer_2), pipe.text_encoder_2)]
        self._empty: list[torch.Tensor] | None = None

    def _run(self, encoder, chunk: Chunk, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.tensor([chunk.ids], device=self.device)
        out = encoder(ids, output_hidden_states=True)
        return out.hidden_states[layer], out[0]

    def _empty_states(self) -> list[torch.Tensor]:
        if self._empty is None:
            self._empty = [self._run(encoder, empty_chunk(chunker), -2)[0] for chunker, encoder in self.encoders]
        return self._empty

    @torch.inference_mode()
    def encode(self, text: str, text_2: str, syntax: str, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[1, 77*k, 2048] hidden states and [1, 1280] pooled for one prompt (text for CLIP-L, text_2 for bigG)."""
        per_encoder: list[list[torch.Tensor]] = []
        pooled = None
        for index, ((chunker, encoder), source) in enumerate(zip(self.encoders, (text, text_2))):
            chunks = layout(chunker, syntax, source)
            if len(chunks) > MAX_CHUNKS:
                raise PromptTooLong(f"{len(chunks)} chunks of 75 tokens; at most {MAX_CHUNKS} fit a record")
            states = []
            for n, chunk in enumerate(chunks):
                hidden, first = self._run(encoder, chunk, layer)
                if index == 1 and n == 0:
                    pooled = first  # bigG's projected EOS state, from the first chunk only (as A1111)
                states.append(self._weighted(hidden, chunk, syntax, self._empty_states()[index]))
            per_encoder.append(states)
        # prompt and prompt_2 may chunk differently: the shorter side is padded with the empty prompt's chunks.
        count = max(len(states) for states in per_encoder)
        for index, states in enumerate(per_encoder):
            states += [self._empty_states()[index]] * (count - len(states))
        hidden = torch.cat([torch.cat(states, dim=1) for states in per_encoder], dim=-1)
        assert pooled is not None
        return hidden, pooled

    @staticmethod
    def _weighted(hidden: torch.Tensor, chunk: Chunk, syntax: str, empty: torch.Tensor) -> torch.Tensor:
        if all(weight == 1.0 for weight in chunk.weights):
            return hidden
        weights = torch.tensor(chunk.weights, dtype=hidden.dtype, device=hidden.device)[None, :, None]
        if syntax == "comfy":
            changed = weights != 1.0
            return torch.where(changed, empty + (hidden - empty) * weights, hidden)
        original = hidden.mean()
        hidden = hidden * weights
        return hidden * (original / hidden.mean())

    def empty_chunks(self, count: int) -> torch.Tensor:
        """`count` chunks of the empty prompt, both encoders side by side: [1, 77*count, 2048]."""
        return torch.cat([torch.cat(self._empty_states(), dim=-1)] * count, dim=1)


def pad_to(hidden: torch.Tensor, chunks: int, compiler: PromptCompiler) -> torch.Tensor:
    missing = chunks - hidden.shape[1] // CHUNK_LEN
    return hidden if missing <= 0 else torch.cat([hidden, compiler.empty_chunks(missing).to(hidden.dtype)], dim=1)
