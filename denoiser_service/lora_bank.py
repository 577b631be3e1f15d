"""The UNet halves of LoRAs on the denoiser: loaded once each as PEFT adapters (the least recently used dropped past
--lora-cache), switched per job with set_adapters, or fused once for a fixed set (--fuse-lora). A job whose LoRA
is not here, or not with the same hash, is refused: it is never rendered without it."""

from __future__ import annotations

from collections import OrderedDict

from sdxl_split.shared.errors import JobError, NotOnThisDenoiser, UserError, first_line
from sdxl_split.shared.loras import LoraFinder, LoraUse, check_shapes, widest_layer


class LoraBank:
    def __init__(self, pipe, finder: LoraFinder, capacity: int = 8) -> None:
        self.pipe = pipe
        self.finder = finder
        self.capacity = max(1, capacity)
        self._loaded: OrderedDict[str, None] = OrderedDict()  # adapter names, least recently used first
        self._active: tuple[tuple[str, float], ...] = ()
        self.fused: tuple[tuple[str, float], ...] | None = None
        self.fused_uses: tuple[LoraUse, ...] = ()

    @staticmethod
    def _key(uses: tuple[LoraUse, ...]) -> tuple[tuple[str, float], ...]:
        return tuple((use.sha256, use.scale) for use in uses)

    def apply(self, uses: tuple[LoraUse, ...]) -> None:
        """Make exactly `uses` active for the next job; raises JobError when one cannot be had here."""
        wanted = self._key(uses)
        if self.fused is not None:
            if wanted != self.fused:
                raise NotOnThisDenoiser(f"this denoiser has LoRAs fused (--fuse-lora: {_names(self.fused_uses)}); "
                                        f"the job needs {_names(uses) or 'none'}; run a denoiser without --fuse-lora "
                                        "for it")
            return
        if wanted == self._active:
            return
        if not uses:
            self.pipe.disable_lora()  # reached only once some job used a LoRA
        else:
            names = [self._adapter(use, keep=set(wanted)) for use in uses]
            self.pipe.enable_lora()
            self.pipe.set_adapters(names, adapter_weights=[use.scale for use in uses])
        self._active = wanted

    def fuse(self, uses: tuple[LoraUse, ...]) -> None:
        """Fuse a fixed set into the UNet's weights: faster per step, and the only set this denoiser renders."""
        try:
            names = [self._adapter(use, keep=set(self._key(uses))) for use in uses]
        except JobError as err:
            raise UserError(f"--fuse-lora: {err}") from None
        if names:
            self.pipe.set_adapters(names, adapter_weights=[use.scale for use in uses])
            self.pipe.fuse_lora(components=["unet"], adapter_names=names)
            # The merged weights stay; the PEFT wrappers, which still cost a branch per layer, go.
            self.pipe.unload_lora_weights()
            self._loaded.clear()
        self.fused, self.fused_uses = self._key(uses), uses

    def _adapter(self, use: LoraUse, keep: set) -> str:
        name = f"lora_{use.sha256[:16]}"
        if name in self._loaded:
            self._loaded.move_to_end(name)
            return name
        # Imported here: they import diffusers, which a denoiser with nothing to render never loads.
        from sdxl_split.denoiser_service.fused_projections import has_fused_projections
        from sdxl_split.denoiser_service.offload_groups import reapply_sized_group_offload

        if has_fused_projections(self.pipe.unet):
            raise NotOnThisDenoiser(f"LoRA {use.name} cannot be switched in on a denoiser with --fuse-qkv: its q/k/v "
                                    "layers are fused into new ones the LoRA does not reach; run this denoiser with "
                                    "--fuse-lora (the LoRA is fused first) or without --fuse-qkv")
        lora = self.finder.by_hash(use)
        if lora is None:
            where = f"under --lora-dir {self.finder.lora_dir}" if self.finder.lora_dir else "(no --lora-dir is set)"
            raise NotOnThisDenoiser(f"LoRA {use.name} (sha256 {use.sha256[:12]}) is not on this denoiser {where}; "
                                    "copy the same file there")
        try:
            # Before anything is read or allocated: a header may declare a rank that would cost terabytes.
            check_shapes(lora.path, widest_layer(self.pipe.unet), "unet")
        except UserError as err:
            raise JobError(str(err)) from None
        try:
            state, alphas, metadata = self.pipe.lora_state_dict(str(lora.path), unet_config=self.pipe.unet.config,
                                                                return_lora_metadata=True)
            self.pipe.load_lora_into_unet(state, alphas, self.pipe.unet, adapter_name=name, metadata=metadata,
                                          _pipeline=self.pipe, low_cpu_mem_usage=True)
        except (ValueError, KeyError, RuntimeError, OSError) as err:
            raise JobError(f"LoRA {lora.path} cannot be read by diffusers ({first_line(err)})") from None
        self._loaded[name] = None
        keep_names = {f"lora_{sha[:16]}" for sha, _ in keep}
        while len(self._loaded) > self.capacity:
            oldest = next((n for n in self._loaded if n not in keep_names), None)
            if oldest is None:
                break  # every loaded adapter is needed by this job
            self.pipe.delete_adapters(oldest)
            del self._loaded[oldest]
        # With --offload group, loading (and deleting) an adapter made diffusers re-apply offload its own way, one
        # group per layer.
        reapply_sized_group_offload(self.pipe.unet)
        return name


def _names(uses) -> str:
    return ", ".join(f"{use.name}:{use.scale:g}" for use in uses)
