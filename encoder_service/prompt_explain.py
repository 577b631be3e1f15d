"""What `sdxl-split prompt explain` shows: how a prompt is read under a syntax, from the tokenizer alone. Its pieces
and their weights first, then each 77-token chunk's tokens and why it ended, then any place where sdxl-split reads
the prompt differently from the tool the syntax comes from."""

from __future__ import annotations

from sdxl_split.encoder_service import prompt_syntax
from sdxl_split.encoder_service.prompt_chunks import CHUNK_TOKENS, Chunk, Chunker, chunked, parsed
from sdxl_split.shared.encoding_settings import MAX_CHUNKS
from sdxl_split.shared.text import plural

_ENDED = {"full": "full", "comma": "moved back to a comma", "BREAK": "BREAK", "end": "end of the prompt",
          "moved": "the next piece moved whole to the next chunk", "cut": "cut: CLIP reads 77 tokens"}


def explain(text: str, syntax: str, tokenizer) -> dict:
    """The report as plain data (`--json`); `as_text` renders it for people."""
    chunker = Chunker(tokenizer)
    if syntax == "compel":
        pieces, notes = _compel_pieces(text)
        chunks = chunker.chunks([(piece, 1.0) for piece, _ in pieces])
        notes.append("compel computes the embeddings itself; the chunks show its text cut at 75 tokens a chunk")
    elif syntax == "plain":
        pieces, notes = [(text, 1.0)], []
        chunks = chunker.chunks([(text, 1.0)])
        if len(chunks) > 1:
            dropped = sum(chunk.content for chunk in chunks[1:])
            notes.append(f"plain reads the first {CHUNK_TOKENS} tokens and drops the other {dropped}; "
                         "--prompt-syntax a1111 keeps them in more chunks")
            chunks = [Chunk(chunks[0].ids, chunks[0].weights, chunks[0].content, "cut")]
        if prompt_syntax.has_syntax(text):
            notes.append("plain reads brackets, weights and BREAK as words; --prompt-syntax a1111 applies them")
    else:
        pieces, notes = parsed(syntax, text)
        chunks = chunked(chunker, syntax, pieces)
    if len(chunks) > MAX_CHUNKS:
        notes.append(f"{len(chunks)} chunks: more than the {MAX_CHUNKS} a prompt may compile to; shorten it")
    return {"syntax": syntax, "text": text, "notes": notes,
            "pieces": [{"break": True} if prompt_syntax.is_break(piece) else
                       {"text": piece[0], "weight": round(piece[1], 6)} for piece in pieces],
            "chunks": [_chunk(number, chunk, tokenizer) for number, chunk in enumerate(chunks)],
            "shape": [1, 77 * len(chunks), "width"]}


def _chunk(number: int, chunk: Chunk, tokenizer) -> dict:
    content = slice(1, 1 + chunk.content)
    return {"chunk": number, "tokens": tokenizer.convert_ids_to_tokens(chunk.ids[content]),
            "ids": chunk.ids[content], "weights": [round(w, 6) for w in chunk.weights[content]],
            "ended_by": chunk.ended_by, **({"moved_to_next_chunk": chunk.moved} if chunk.moved else {})}


def _compel_pieces(text: str) -> tuple[list[tuple[str, float]], list[str]]:
    """compel's own reading of the text, flattened to (text, weight) fragments."""
    try:
        from compel.prompt_parser import PromptParser
    except ImportError:
        return [(text, 1.0)], ["compel is not installed (pip install 'sdxl-split[compel]'): its weights are not shown"]
    conjunction = PromptParser().parse_conjunction(text)
    pieces = [(fragment.text, float(fragment.weight)) for prompt in conjunction.prompts
              for fragment in getattr(prompt, "children", [])]
    return pieces or [(text, 1.0)], []


def as_text(report: dict) -> str:
    lines = [f"{report['syntax']}: {report['text']!r}", "pieces:"]
    for piece in report["pieces"]:
        lines.append("  BREAK" if piece.get("break") else f"  {piece['weight']:<8g} {piece['text']!r}")
    for chunk in report["chunks"]:
        words = [token.removesuffix("</w>") + ("" if weight == 1.0 else f"({weight:g})")
                 for token, weight in zip(chunk["tokens"], chunk["weights"])]
        moved = f", {chunk['moved_to_next_chunk']} moved on" if chunk.get("moved_to_next_chunk") else ""
        ended = _ENDED[chunk["ended_by"]]
        lines.append(f"chunk {chunk['chunk']}: {plural(len(words), 'token')}, ended by {ended}{moved}")
        lines.append("  " + " ".join(words))
    lines.append(f"embeddings: [1, {report['shape'][1]}, width]")
    lines += [f"note: {note}" for note in report["notes"]]
    return "\n".join(lines)
