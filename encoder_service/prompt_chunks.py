"""Parsed prompt pieces into CLIP's 77-token chunks, for one tokenizer, the way A1111 or ComfyUI lays them out.

Each chunk holds 75 tokens between BOS and EOS. Short chunks are padded with EOS; the tokenizer's own pad id then
replaces everything after the first EOS, which is how diffusers' tokenizers pad too (EOS for CLIP-L, "!" for
OpenCLIP bigG), so a one-chunk prompt gets exactly the ids diffusers would give it.
- A1111: a chunk that fills up moves back to its last comma when that comma is within the last 20 tokens (so a
  phrase is not cut in half), and BREAK closes a chunk early.
- ComfyUI: each piece's tokens stay together: a piece of fewer than 8 tokens that does not fit moves whole to the
  next chunk; a longer one is cut at the chunk's end. No commas, no BREAK.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sdxl_split.encoder_service.prompt_syntax import Piece, is_break

CHUNK_TOKENS = 75
COMMA_BACKTRACK = 20
# ComfyUI keeps a piece of fewer tokens than this whole, moving it to the next chunk rather than cutting it.
COMFY_WHOLE_BELOW = 8


@dataclass
class Chunk:
    ids: list[int] = field(default_factory=list)  # 77: BOS, content, EOS and padding
    weights: list[float] = field(default_factory=list)  # one per id; 1.0 for BOS, EOS and padding
    content: int = 0  # tokens of the prompt in it
    # Why it ended: "full", "comma" (moved back to a comma), "BREAK", "moved" (ComfyUI: the next piece did not
    # fit) or "end".
    ended_by: str = "end"
    moved: int = 0  # tokens carried to the next chunk by the comma rule


class Chunker:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.bos = tokenizer.bos_token_id
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.comma = tokenizer.convert_tokens_to_ids(",</w>")

    def token_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, truncation=False).input_ids if text else []

    def chunks(self, pieces: list[Piece]) -> list[Chunk]:
        done: list[Chunk] = []
        tokens: list[tuple[int, float]] = []
        last_comma = -1

        def close(reason: str, carry: list[tuple[int, float]] | None = None) -> None:
            nonlocal tokens, last_comma
            done.append(self._wrap(tokens, reason, len(carry or ())))
            tokens, last_comma = list(carry or ()), -1

        for piece in pieces:
            if is_break(piece):
                close("BREAK")
                continue
            text, weight = piece
            for token in self.token_ids(text):
                if token == self.comma:
                    last_comma = len(tokens)
                elif (len(tokens) == CHUNK_TOKENS and last_comma != -1
                      and CHUNK_TOKENS - last_comma <= COMMA_BACKTRACK):
                    cut = last_comma + 1
                    tokens, carry = tokens[:cut], tokens[cut:]
                    close("comma", carry)
                if len(tokens) == CHUNK_TOKENS:
                    close("full")
                tokens.append((token, weight))
        if tokens or not done:
            close("end")
        return done

    def comfy_chunks(self, pieces: list[Piece]) -> list[Chunk]:
        done: list[Chunk] = []
        tokens: list[tuple[int, float]] = []
        for text, weight in pieces:
            group = [(token, weight) for token in self.token_ids(text)]
            large = len(group) >= COMFY_WHOLE_BELOW
            while group:
                room = CHUNK_TOKENS - len(tokens)
                if len(group) <= room:
                    tokens += group
                    break
                if large:
                    tokens += group[:room]
                    group = group[room:]
                    done.append(self._wrap(tokens, "full", 0))
                else:
                    done.append(self._wrap(tokens, "moved", len(group)))
                tokens = []
        done.append(self._wrap(tokens, "end", 0))
        return done

    def _wrap(self, tokens: list[tuple[int, float]], reason: str, moved: int) -> Chunk:
        content = [t for t, _ in tokens]
        padding = CHUNK_TOKENS - len(content)
        ids = [self.bos, *content, self.eos] + [self.eos] * padding
        first_eos = len(content) + 1
        ids = ids[: first_eos + 1] + [self.pad] * (len(ids) - first_eos - 1)
        weights = [1.0, *(w for _, w in tokens), 1.0] + [1.0] * padding
        return Chunk(ids=ids, weights=weights, content=len(content), ended_by=reason, moved=moved)


def empty_chunk(chunker: Chunker) -> Chunk:
    """The empty prompt's chunk: what pads a shorter prompt, and what ComfyUI's weights interpolate from."""
    return chunker._wrap([], "end", 0)


def parsed(syntax: str, text: str) -> tuple[list, list[str]]:
    """(pieces, notes) of `text` under an a1111 or comfy syntax."""
    from sdxl_split.encoder_service import comfy_syntax, prompt_syntax

    return (comfy_syntax if syntax == "comfy" else prompt_syntax).parse_with_notes(text)


def chunked(chunker: Chunker, syntax: str, pieces: list) -> list[Chunk]:
    """The chunks of parsed pieces: ComfyUI cuts them its own way."""
    return chunker.comfy_chunks(pieces) if syntax == "comfy" else chunker.chunks(pieces)


def layout(chunker: Chunker, syntax: str, text: str) -> list[Chunk]:
    """The chunks of `text` under an a1111 or comfy syntax."""
    return chunked(chunker, syntax, parsed(syntax, text)[0])
