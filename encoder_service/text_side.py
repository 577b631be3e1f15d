"""The text side of SDXL: tokenizers and both CLIP encoders, run through diffusers' own encode_prompt."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from sdxl_split.shared.embeddings import CHUNK_LEN, DTYPES, TENSOR_NAMES
from sdxl_split.shared.errors import UserError, first_line
from sdxl_split.shared.loras import check_shapes, widest_layer
from sdxl_split.shared.models.loading import TEXT_ONLY, load_partial_pipeline
from sdxl_split.shared.models.resolve import ModelSource
from sdxl_split.shared.prompts import PromptEntry

# Distinct negative prompts kept encoded (least recently used dropped first): a run shares one or a few.
MAX_REMEMBERED_NEGATIVES = 32


@dataclass(frozen=True)
class EncodedPrompt:
    tensors: dict[str, torch.Tensor]
    # The text CLIP dropped past its 77-token window, per field, empty when nothing was cut.
    dropped: dict[str, str]


def _inversion_problem(token: str, vectors: torch.Tensor | None, key: str, encoder, tokenizer) -> str | None:
    """Why these vectors cannot be an inversion's for this encoder, with the fix; None when they can."""
    if vectors is None:
        return f"it holds no {key} tensor; an SDXL embedding holds clip_l and clip_g vectors"
    vectors = vectors[None] if vectors.dim() == 1 else vectors
    width = encoder.get_input_embeddings().weight.shape[1]
    if vectors.dim() != 2:
        return (f"its {key} tensor has shape {list(vectors.shape)}; an embedding is one vector or a [count, width] "
                "matrix of them: the file is damaged or is not a textual inversion")
    if vectors.shape[0] < 1:
        return f"its {key} tensor has shape {list(vectors.shape)}: no vectors; the file is damaged"
    if vectors.shape[1] != width:
        return (f"its {key} vectors are {vectors.shape[1]} wide but this model's encoder takes {width}: it was made "
                "for another model (an SD 1.5 embedding, say)")
    if not bool(torch.isfinite(vectors).all()):
        return f"its {key} vectors hold NaN or Inf; the file is damaged"
    if token in tokenizer.get_vocab():
        return (f"its token {token!r} (the file's name) is already a word CLIP knows; rename the file, e.g. to "
                f"{token}-embedding.safetensors, and write that name in prompts")
    return None


class TextSide:
    """Holds only the text components; diffusers skips loading the UNet and VAE weights entirely."""

    def __init__(self, source: ModelSource, device: str, dtype: str, inversions: tuple = (),
                 lora_capacity: int = 16) -> None:
        self.device = torch.device(device)
        self.pipe = load_partial_pipeline(source, TEXT_ONLY, DTYPES[dtype], add_watermarker=False)
        self.pipe.to(self.device)
        for inversion in inversions:
            self._load_inversion(inversion)
        # Text-encoder halves of LoRAs loaded as PEFT adapters, least recently used first; and the set in use.
        self._adapters: OrderedDict[str, None] = OrderedDict()
        self._lora_capacity = lora_capacity
        self._active: tuple = ()
        self.tokenizers = [t for t in (self.pipe.tokenizer, self.pipe.tokenizer_2) if t is not None]
        # (negative_prompt, negative_prompt_2) -> (negative_prompt_embeds, negative_pooled_prompt_embeds), each
        # [1, ...]. diffusers encodes the negative in forward passes of its own, which never see the positive
        # prompt, so one encoding of a run's shared negative serves every prompt, bit for bit.
        self._negatives: OrderedDict[tuple[str, str | None], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._compiler = None  # the a1111/comfy compiler, made on first use
        self._compel_for_sdxl = None

    def _dropped_tail(self, text: str | None) -> str:
        """What CLIP's truncation drops, decoded the way diffusers reports it."""
        if not text:
            return ""
        for tokenizer in self.tokenizers:
            ids = tokenizer(text, padding="longest", return_tensors="pt").input_ids
            if ids.shape[-1] > tokenizer.model_max_length:
                return tokenizer.batch_decode(ids[:, tokenizer.model_max_length - 1 : -1])[0]
        return ""

    def _load_inversion(self, inversion) -> None:
        """An SDXL textual inversion: its clip_l vectors into CLIP-L, its clip_g vectors into bigG, under its token."""
        from safetensors.torch import load_file

        try:
            vectors = load_file(str(inversion.path))
        except (ValueError, OSError) as err:
            raise UserError(f"textual inversion {inversion.path} is not a readable .safetensors file "
                            f"({first_line(err)})") from None
        pairs = (("clip_l", self.pipe.text_encoder, self.pipe.tokenizer),
                 ("clip_g", self.pipe.text_encoder_2, self.pipe.tokenizer_2))
        for key, encoder, tokenizer in pairs:  # all checked before any is loaded: nothing half-added
            if problem := _inversion_problem(inversion.token, vectors.get(key), key, encoder, tokenizer):
                raise UserError(f"textual inversion {inversion.path}: {problem}")
        # The token stands for as many words in each encoder: a prompt's two token streams must stay aligned.
        counts = [vectors[key].reshape(-1, vectors[key].shape[-1]).shape[0] for key, _, _ in pairs]
        if counts[0] != counts[1]:
            raise UserError(f"textual inversion {inversion.path}: it holds {counts[0]} clip_l vectors but "
                            f"{counts[1]} clip_g vectors; an SDXL embedding has as many of each: the file is damaged")
        try:
            for key, encoder, tokenizer in pairs:
                self.pipe.load_textual_inversion(vectors[key], token=inversion.token, text_encoder=encoder,
                                                 tokenizer=tokenizer)
        except (KeyError, ValueError, OSError) as err:
            raise UserError(f"textual inversion {inversion.path} cannot be used ({first_line(err)})") from None

    def use_loras(self, loras: tuple) -> None:
        """Make exactly these (Lora, scale) pairs active on both text encoders; none: LoRA off."""
        wanted = tuple((lora.sha256, scale) for lora, scale in loras)
        if wanted == self._active:
            return
        if not loras:
            self.pipe.disable_lora()  # only reached after some prompt used a LoRA
        else:
            names = [self._adapter(lora, keep={lora.sha256 for lora, _ in loras}) for lora, _ in loras]
            self.pipe.enable_lora()
            self.pipe.set_adapters(names, adapter_weights=[{"text_encoder": s, "text_encoder_2": s}
                                                           for _, s in loras])
        self._active = wanted

    def _adapter(self, lora, keep: set[str]) -> str:
        name = f"lora_{lora.sha256[:16]}"
        if name in self._adapters:
            self._adapters.move_to_end(name)
            return name
        # Before anything is read or allocated: a header may declare a rank that would cost terabytes.
        check_shapes(lora.path, widest_layer(self.pipe.text_encoder, self.pipe.text_encoder_2), "text")
        try:
            state, alphas, metadata = self.pipe.lora_state_dict(str(lora.path), return_lora_metadata=True)
            for prefix, encoder in (("text_encoder", self.pipe.text_encoder),
                                    ("text_encoder_2", self.pipe.text_encoder_2)):
                if any(key.startswith(prefix + ".") for key in state):
                    self.pipe.load_lora_into_text_encoder(state, alphas, encoder, prefix=prefix, adapter_name=name,
                                                          metadata=metadata, _pipeline=self.pipe,
                                                          low_cpu_mem_usage=True)
        except (ValueError, KeyError, RuntimeError, OSError) as err:
            raise UserError(f"LoRA {lora.path} cannot be read by diffusers ({first_line(err)})") from None
        self._adapters[name] = None
        while len(self._adapters) > self._lora_capacity:
            oldest = next(n for n in self._adapters if n[len("lora_"):] not in {s[:16] for s in keep})
            self.pipe.delete_adapters(oldest)
            del self._adapters[oldest]
        return name

    def _remember(self, pair: tuple[str, str | None], embeds: torch.Tensor, pooled: torch.Tensor) -> None:
        if pair in self._negatives:
            self._negatives.move_to_end(pair)
            return
        self._negatives[pair] = (embeds.detach().clone(), pooled.detach().clone())
        if len(self._negatives) > MAX_REMEMBERED_NEGATIVES:
            self._negatives.popitem(last=False)

    @property
    def max_clip_skip(self) -> int:
        """diffusers reads hidden state -(clip_skip + 2): the shallower encoder's layers less one (the built-in tiny
        model has 4 layers; SDXL's CLIP-L 12)."""
        return min(encoder.config.num_hidden_layers for encoder in (self.pipe.text_encoder, self.pipe.text_encoder_2)
                   if encoder is not None) - 1

    def check_clip_skip(self, clip_skip: int | None) -> None:
        """A clip skip deeper than this model's text encoders is one line, not an IndexError."""
        most = self.max_clip_skip
        if clip_skip and clip_skip > most:
            raise UserError(f"skipping {clip_skip} final CLIP layers goes deeper than this model's text encoders "
                            f"({most + 1} layers): at most {most} can be skipped")

    @torch.inference_mode()
    def encode(self, entries: list[PromptEntry], clip_skip: int | None) -> list[EncodedPrompt]:
        """Encode prompts that share one negative mode (all given, or all absent) in one forward pass."""
        self.check_clip_skip(clip_skip)
        has_negative = entries[0].negative_prompt is not None
        if any((e.negative_prompt is not None) != has_negative for e in entries):
            raise ValueError("a batch must not mix prompts with and without a negative prompt")
        negatives = [(e.negative_prompt, e.negative_prompt_2 or e.negative_prompt) for e in entries]
        known = has_negative and all(pair in self._negatives for pair in negatives)
        reused = {}
        if known:
            reused = {"negative_prompt_embeds": torch.cat([self._negatives[pair][0] for pair in negatives]),
                      "negative_pooled_prompt_embeds": torch.cat([self._negatives[pair][1] for pair in negatives])}
        outputs = self.pipe.encode_prompt(
            prompt=[e.prompt for e in entries],
            prompt_2=[e.prompt_2 or e.prompt for e in entries],
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=[e.negative_prompt for e in entries] if has_negative else None,
            # Without a negative_prompt, diffusers still encodes negative_prompt_2 when it does not zero
            # the negatives (force_zeros_for_empty_prompt false), pairing it with "".
            negative_prompt_2=(
                [e.negative_prompt_2 or e.negative_prompt for e in entries] if has_negative
                else [e.negative_prompt_2 or "" for e in entries] if any(e.negative_prompt_2 for e in entries)
                else None
            ),
            clip_skip=clip_skip,
            **{name: tensor.to(self.device) for name, tensor in reused.items()},
        )
        if has_negative:
            for row, pair in enumerate(negatives):
                self._remember(pair, outputs[1][row : row + 1], outputs[3][row : row + 1])
        results = []
        for row, entry in enumerate(entries):
            tensors = {name: out[row : row + 1].detach().to("cpu").clone() for name, out in zip(TENSOR_NAMES, outputs)}
            dropped = {field: tail for field, text in entry.texts().items() if (tail := self._dropped_tail(text))}
            results.append(EncodedPrompt(tensors=tensors, dropped=dropped))
        return results

    @torch.inference_mode()
    def encode_compiled(self, entry: PromptEntry, clip_skip: int | None, syntax: str) -> EncodedPrompt:
        """One prompt in a1111, comfy or compel syntax: [1, 77*k, 2048] tensors, nothing truncated."""
        self.check_clip_skip(clip_skip)
        if syntax == "compel":
            tensors = self._compel(entry)
        else:
            tensors = self._chunked(entry, clip_skip, syntax)
        dtype = self.pipe.text_encoder_2.dtype
        return EncodedPrompt(tensors={name: tensors[name].to(dtype=dtype).to("cpu").clone() for name in TENSOR_NAMES},
                             dropped={})

    def _zero_negative(self, entry: PromptEntry) -> bool:
        """diffusers' rule: no negative prompt and force_zeros_for_empty_prompt make the negatives zeros."""
        return (entry.negative_prompt is None and not entry.negative_prompt_2
                and bool(getattr(self.pipe.config, "force_zeros_for_empty_prompt", False)))

    def _chunked(self, entry: PromptEntry, clip_skip: int | None, syntax: str) -> dict[str, torch.Tensor]:
        from sdxl_split.encoder_service.prompt_compiler import PromptCompiler, pad_to

        if self._compiler is None:
            self._compiler = PromptCompiler(self.pipe, self.device)
        compiler = self._compiler
        # As diffusers: --clip-skip picks the positive's layer; negatives always use the penultimate one.
        layer = -(clip_skip + 2) if clip_skip else -2
        positive, pooled = compiler.encode(entry.prompt, entry.prompt_2 or entry.prompt, syntax, layer)
        if self._zero_negative(entry):
            negative, negative_pooled = torch.zeros_like(positive), torch.zeros_like(pooled)
        else:
            pair = (f"{syntax}:{entry.negative_prompt or ''}", entry.negative_prompt_2 or entry.negative_prompt)
            if pair not in self._negatives:
                self._remember(pair, *compiler.encode(entry.negative_prompt or "", pair[1] or "", syntax, -2))
            negative, negative_pooled = self._negatives[pair]
        chunks = max(positive.shape[1], negative.shape[1]) // CHUNK_LEN
        if not self._zero_negative(entry):
            positive, negative = pad_to(positive, chunks, compiler), pad_to(negative, chunks, compiler)
        return {"prompt_embeds": positive, "negative_prompt_embeds": negative, "pooled_prompt_embeds": pooled,
                "negative_pooled_prompt_embeds": negative_pooled}

    def _compel(self, entry: PromptEntry) -> dict[str, torch.Tensor]:
        if self._compel_for_sdxl is None:
            try:
                from compel import CompelForSDXL
            except ImportError:
                raise UserError("--prompt-syntax compel needs the compel package: pip install "
                                "'sdxl-split[compel]'") from None
            self._compel_for_sdxl = CompelForSDXL(self.pipe, device=str(self.device))
        zero = self._zero_negative(entry)
        out = self._compel_for_sdxl(entry.prompt, style_prompt=entry.prompt_2,
                                    negative_prompt=None if zero else entry.negative_prompt or "",
                                    negative_style_prompt=None if zero else entry.negative_prompt_2)
        negative = torch.zeros_like(out.embeds) if zero else out.negative_embeds
        negative_pooled = torch.zeros_like(out.pooled_embeds) if zero else out.negative_pooled_embeds
        return {"prompt_embeds": out.embeds, "negative_prompt_embeds": negative,
                "pooled_prompt_embeds": out.pooled_embeds, "negative_pooled_prompt_embeds": negative_pooled}
