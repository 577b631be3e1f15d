"""What a prompt line asks for beyond its text, resolved the same way on both sides of the split: its LoRAs (the
run's --lora, its JSONL `loras`, its <lora:...> tags) and the textual-inversion tokens it uses.

The text-encoder half of its LoRAs and its inversions change the embeddings, so they go into the cache key; the
UNet half travels with the job, for the denoiser.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from sdxl_split.shared.digests import DigestMemo
from sdxl_split.shared.errors import UserError
from sdxl_split.shared.loras import Lora, LoraFinder, LoraUse, strip_tags
from sdxl_split.shared.prompts import MAX_LORAS, PromptEntry


@dataclass(frozen=True)
class Inversion:
    """A textual-inversion file: its token is the file's stem; it holds `clip_l` and `clip_g` vectors."""

    token: str
    path: Path
    sha256: str


@dataclass(frozen=True)
class Extras:
    # The line as it is encoded: <lora:...> tags taken out of the prompt.
    entry: PromptEntry
    text_loras: tuple[tuple[Lora, float], ...] = ()
    unet_loras: tuple[LoraUse, ...] = ()
    # The files of the UNet halves, as found on this host.
    unet_files: tuple[Lora, ...] = ()
    # (token, sha256) of each inversion whose token its texts use.
    inversions: tuple[tuple[str, str], ...] = ()

    @property
    def text_uses(self) -> tuple[LoraUse, ...]:
        return tuple(lora.use(scale) for lora, scale in self.text_loras)


@dataclass(frozen=True)
class ExtrasSpec:
    """The options that choose LoRAs and inversions (--lora, --lora-dir, --embedding, --embedding-dir)."""

    run_loras: tuple[tuple[str, float], ...] = ()
    lora_dir: Path | None = None
    inversion_files: tuple[Path, ...] = ()
    inversion_dir: Path | None = None

    def resolver(self, cache_dir: Path) -> ExtrasResolver:
        return ExtrasResolver(self.run_loras, self.lora_dir, self.inversion_files, self.inversion_dir, cache_dir)


class ExtrasResolver:
    def __init__(self, run_loras: tuple[tuple[str, float], ...], lora_dir: Path | None,
                 inversion_files: tuple[Path, ...], inversion_dir: Path | None, cache_dir: Path) -> None:
        self.run_loras = run_loras
        self.finder = LoraFinder(lora_dir, cache_dir)
        self.inversions = _inversions(inversion_files, inversion_dir, cache_dir)
        for spec, _ in run_loras:
            self.finder.find(spec)  # a --lora that does not exist fails now, before anything loads

    def unet_files(self, entries) -> tuple[Path, ...]:
        """Every LoRA file with a UNet half that these lines use, as resolved here: what a local denoiser is handed,
        so it renders the very files this process found, from any folder."""
        found = {lora.sha256: lora.path for spec, _ in self.run_loras if (lora := self.finder.find(spec)).unet}
        for entry in entries:
            found.update((lora.sha256, lora.path) for lora in self.resolve(entry).unet_files)
        return tuple(found.values())

    def check(self, path: Path, entries) -> None:
        """Resolve every line now, so a missing or unreadable LoRA is one line naming file:line before any model
        loads."""
        for entry in entries:
            try:
                self.resolve(entry)
            except UserError as err:
                raise UserError(f"{path}:{entry.line}: {err}") from None

    def resolve(self, entry: PromptEntry) -> Extras:
        prompt, tagged = strip_tags(entry.prompt)
        # --lora takes a path or a name; a line's own LoRAs a name in --lora-dir, or a JSONL path (made absolute
        # when the file was read); a tag a name only, so a prompt can never reach a file outside --lora-dir.
        asked = [(self.finder.find(spec), scale) for spec, scale in self.run_loras]
        asked += [(self.finder.find(spec) if Path(spec).is_absolute() else self.finder.find_named(spec), scale)
                  for spec, scale in entry.loras or ()]
        asked += [(self.finder.find_named(name), scale) for name, scale in tagged]
        # One file asked for twice counts once, at the scale asked last.
        chosen: dict[str, tuple[Lora, float]] = {}
        for lora, scale in asked:
            chosen.pop(lora.sha256, None)
            chosen[lora.sha256] = (lora, scale)
        if len(chosen) > MAX_LORAS:
            raise UserError(f"{len(chosen)} LoRAs; at most {MAX_LORAS} per prompt")
        texts = [t for t in (prompt, entry.prompt_2, entry.negative_prompt, entry.negative_prompt_2) if t]
        used = tuple((inv.token, inv.sha256) for inv in self.inversions if any(inv.token in t for t in texts))
        return Extras(
            entry=replace(entry, prompt=prompt) if prompt != entry.prompt else entry,
            text_loras=tuple((lora, scale) for lora, scale in chosen.values() if lora.text),
            unet_loras=tuple(lora.use(scale) for lora, scale in chosen.values() if lora.unet),
            unet_files=tuple(lora for lora, _ in chosen.values() if lora.unet),
            inversions=used)


def _inversions(files: tuple[Path, ...], folder: Path | None, cache_dir: Path) -> tuple[Inversion, ...]:
    paths = list(files)
    if folder is not None:
        if not folder.is_dir():
            raise UserError(f"--embedding-dir {folder} is not a folder")
        paths += sorted(folder.glob("*.safetensors"))
    memo = DigestMemo(cache_dir)
    found: dict[str, Inversion] = {}
    for path in paths:
        if not path.is_file() or path.suffix.lower() != ".safetensors":
            raise UserError(f"textual inversion {path} is not a .safetensors file")
        token = path.stem
        if token in found and found[token].path != path.resolve():
            raise UserError(f"two textual inversions are named {token!r}: {found[token].path} and {path}")
        found[token] = Inversion(token, path.resolve(), memo.sha256(path))
    memo.save()
    return tuple(found.values())
