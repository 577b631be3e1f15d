"""The option groups `encode`, `render`, `run` and `bench` share, and the frozen configs built from them."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

import click

from sdxl_split.cli.common import DTYPE_CHOICES, check_device, default_dtype
from sdxl_split.denoiser_service.config import (
    ATTENTION,
    COMPILE_MODES,
    OFFLOAD,
    SCHEDULERS,
    VAE_KINDS,
    RenderConfig,
    parse_size,
    validate,
)
from sdxl_split.shared.prompts import SYNTAXES
from sdxl_split.shared.settings import GlobalOptions

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5577"


def apply_options(func, options: list):
    """Decorate `func` with click options so --help lists them in the order given."""
    for option in reversed(options):
        func = option(func)
    return func


@dataclass(frozen=True)
class Encoding:
    """What encoding_options chose: everything that, with the model, decides the embeddings."""

    negative_prompt: str | None
    clip_skip: int | None
    encoder_dtype: str | None
    encoder_device: str
    prompt_syntax: str
    loras: tuple[str, ...] = ()
    lora_dir: Path | None = None
    embeddings: tuple[Path, ...] = ()
    embedding_dir: Path | None = None

    @classmethod
    def pop_from(cls, kw: dict) -> Encoding:
        """Take encoding_options' values out of a command's keyword arguments."""
        return cls(**{name: kw.pop(name) for name in ("negative_prompt", "clip_skip", "encoder_dtype",
                                                      "encoder_device", "prompt_syntax", "loras", "lora_dir",
                                                      "embeddings", "embedding_dir")})

    def extras(self):
        from sdxl_split.shared.loras import parse_flag
        from sdxl_split.shared.prompt_extras import ExtrasSpec

        return ExtrasSpec(run_loras=tuple(parse_flag(text) for text in self.loras), lora_dir=self.lora_dir,
                          inversion_files=tuple(self.embeddings), inversion_dir=self.embedding_dir)

    @property
    def dtype(self) -> str:
        return default_dtype(self.encoder_device, self.encoder_dtype)

    def settings(self, source, cache_dir: Path):
        from sdxl_split.shared.embeddings import encoding_settings

        return encoding_settings(source, cache_dir, self.dtype, self.clip_skip, self.prompt_syntax)


def encoding_options(func):
    """Options that change the embeddings; `render --prompts` takes the same ones to find them."""
    return apply_options(func, [
        click.option("--negative-prompt", default=None, help="Negative prompt for every line that has none."),
        click.option("--prompt-syntax", type=click.Choice(SYNTAXES), default="plain", show_default=True,
                     help="How prompts are read: plain (as diffusers: 77 tokens, no weights), a1111 (A1111's "
                          "(word:1.3), [word], BREAK, chunks past 77 tokens), comfy (the same syntax with "
                          "ComfyUI's weighting), compel (compel's word++, .and(), .blend(); needs the compel "
                          "extra). A JSONL `syntax` field overrides it per line; `sdxl-split prompt explain` "
                          "shows how a prompt compiles."),
        click.option("--lora", "loras", multiple=True, metavar="FILE[:SCALE]",
                     help="A LoRA for every prompt (repeatable): a .safetensors path, or a name under --lora-dir; "
                          "scale 1.0 unless given. Prompts add their own with <lora:NAME:SCALE> or a JSONL `loras` "
                          "list. The encoder applies the text-encoder half, the denoiser the UNet half."),
        click.option("--lora-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                     envvar="SDXL_SPLIT_LORA_DIR",
                     help="Where LoRA names are looked up [env SDXL_SPLIT_LORA_DIR]; give both sides the same "
                          "files."),
        click.option("--embedding", "embeddings", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
                     help="An SDXL textual inversion (clip_l + clip_g tensors); its token is the file's stem. "
                          "Repeatable; the encoder alone needs it."),
        click.option("--embedding-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="Every .safetensors textual inversion in this folder."),
        click.option("--clip-skip", type=click.IntRange(0, 10), default=None,
                     help="Skip this many final CLIP layers (as diffusers' clip_skip)."),
        click.option("--encoder-dtype", "encoder_dtype", type=click.Choice(DTYPE_CHOICES), default=None,
                     help="dtype of the cached embeddings [default: fp32 on cpu, else fp16]."),
        click.option("--encoder-device", "encoder_device", default="cpu", show_default=True,
                     help="Device the text encoders run on."),
    ])


def link_options(func):
    """Where the encoder listens for denoisers, and how it treats them."""
    return apply_options(func, [
        click.option("--bind", default=DEFAULT_ENDPOINT, show_default=True, envvar="SDXL_SPLIT_BIND",
                     help="ZeroMQ endpoint denoisers connect to (tcp://HOST:PORT or ipc://PATH)."),
        click.option("--wait", "wait_s", type=click.FloatRange(0), default=10.0, show_default=True,
                     envvar="SDXL_SPLIT_WAIT",
                     help="Seconds to wait for a denoiser once the cache is filled; with none, exit 0 and print "
                          "how to render later."),
        click.option("--curve", "curve_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="Encrypt and authenticate with CurveZMQ: the encoder/ folder from `keys init`."),
        max_attempts_option(),
        job_timeout_option(),
        click.option("--throttle", type=float, default=0.0, hidden=True,
                     help="Test hook: seconds to serve the link after each prompt."),
    ])


def max_attempts_option():
    return click.option("--max-attempts", type=click.IntRange(1, 100), default=3, show_default=True,
                        help="A job that fails (or kills its denoiser) this many times is dead-lettered.")


def threads_option():
    return click.option("--threads", type=click.IntRange(1, 1024), default=None,
                        help="CPU threads for torch in this process [default: one per core]; lower it when "
                             "another process shares the CPU (`run` splits the cores by itself).")


def job_timeout_option():
    return click.option("--job-timeout", type=click.FloatRange(min=1), default=None,
                        help="Seconds a denoiser may hold jobs without finishing one before they go to another "
                             "denoiser and it is dropped (a hung render) [default: 10x that denoiser's slowest job, "
                             "at least 120 s; 1800 s for its first, which may compile].")


def credits_option():
    return click.option("--credits", type=click.IntRange(1, 64), default=2, show_default=True,
                        help="Jobs a denoiser holds at once; 2 keeps the next job's embeddings local while one "
                             "renders.")


def lora_serving_options(func):
    """How a denoiser holds the UNet halves of LoRAs."""
    return apply_options(func, [
        click.option("--lora-cache", type=click.IntRange(1, 256), default=8, show_default=True,
                     help="LoRA adapters kept loaded at once; the least recently used is dropped past this."),
        click.option("--fuse-lora", is_flag=True,
                     help="Fuse the --lora set into the UNet's weights (faster per step); jobs that need any "
                          "other set are refused, to go to another denoiser."),
    ])


def render_options(func):
    """The denoiser's knobs; `run` and `bench` take the same ones."""
    return apply_options(func, [
        click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("images"),
                     show_default=True, help="Output folder for PNGs and manifest.jsonl."),
        click.option("--device", default=None, help="cuda, cuda:N or cpu [default: cuda if present, else cpu]."),
        click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default=None,
                     help="UNet/VAE dtype [default: fp16 on GPU, fp32 on CPU]."),
        click.option("--attention", type=click.Choice(ATTENTION), default="sdpa", show_default=True,
                     help="sdpa = PyTorch scaled_dot_product_attention; default = the classic AttnProcessor."),
        click.option("--compile", "compile_unet", is_flag=True,
                     help="torch.compile the UNet (fullgraph). The first image compiles; a new size or batch "
                          "recompiles."),
        click.option("--compile-mode", type=click.Choice(COMPILE_MODES), default="default", show_default=True,
                     help="torch.compile mode for --compile and --compile-vae; max-autotune searches GEMM kernels "
                          "for minutes on the first image, reduce-overhead adds CUDA graphs."),
        click.option("--compile-vae", is_flag=True, help="torch.compile the VAE decoder too."),
        click.option("--channels-last", is_flag=True,
                     help="NHWC memory layout for the UNet and VAE (faster convolutions on tensor-core GPUs)."),
        click.option("--fuse-qkv", is_flag=True,
                     help="Fuse each attention's q/k/v projections into one matmul (needs --attention sdpa)."),
        click.option("--vae", type=click.Choice(VAE_KINDS), default="full", show_default=True,
                     help="full = the model's AutoencoderKL; tiny = AutoencoderTiny (taesdxl), fast previews."),
        click.option("--vae-model", default=None,
                     help="Tiny VAE for --vae tiny [default: the model's vae_tiny/, else madebyollin/taesdxl]."),
        click.option("--vae-slicing", is_flag=True, help="Decode the batch one image at a time."),
        click.option("--vae-tiling", is_flag=True, help="Decode in overlapping tiles (see --vae-tile-size)."),
        click.option("--vae-tile-size", type=int, default=512, show_default=True, help="Tile size in pixels."),
        click.option("--offload", type=click.Choice(OFFLOAD), default="none", show_default=True,
                     help="CPU offload: model (whole models), sequential (every layer), group (every layer, the "
                          "next one uploading on a side stream while this one computes)."),
        click.option("--steps", type=click.IntRange(1, 1000), default=25, show_default=True,
                     help="Denoising steps per image."),
        click.option("--guidance", type=float, default=5.0, show_default=True, help="Classifier-free guidance scale."),
        click.option("--size", default="1024x1024", show_default=True, help="WIDTHxHEIGHT, multiples of 8."),
        click.option("--images-per-prompt", type=click.IntRange(1, 64), default=1, show_default=True,
                     help="Images per prompt (a JSONL 'count' overrides it)."),
        click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True,
                     help="Image i of a prompt uses seed+i (a JSONL 'seed' overrides it)."),
        click.option("--scheduler", type=click.Choice(list(SCHEDULERS)), default="euler", show_default=True),
        click.option("--metadata", type=click.Choice(["a1111", "full"]), default="a1111", show_default=True,
                     help="a1111: PNGs name the model as A1111 does (hub id, checkpoint stem or folder name, with "
                          "its AutoV2 hash); full: also the --model value itself, local paths included."),
    ])


def render_config_from(kw: dict, remote: bool = False) -> RenderConfig:
    """The frozen RenderConfig from render_options' values, refused before anything loads if it cannot work.
    `remote`: the denoisers run on other machines (Ray), so this one's lack of a GPU says nothing."""
    import torch

    device = kw["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    width, height = parse_size(kw["size"])
    config = RenderConfig(
        out_dir=kw["out_dir"], device=device, dtype=default_dtype(device, kw["dtype"]), attention=kw["attention"],
        compile=kw["compile_unet"], compile_mode=kw["compile_mode"], compile_vae=kw["compile_vae"],
        channels_last=kw["channels_last"], fuse_qkv=kw["fuse_qkv"], vae=kw["vae"], vae_model=kw["vae_model"],
        vae_slicing=kw["vae_slicing"], vae_tiling=kw["vae_tiling"], vae_tile_size=kw["vae_tile_size"],
        offload=kw["offload"], steps=kw["steps"], guidance=kw["guidance"], width=width, height=height,
        images_per_prompt=kw["images_per_prompt"], seed=kw["seed"], scheduler=kw["scheduler"],
    )
    validate(config, remote or torch.cuda.is_available())
    if not config.device.startswith("cuda"):
        check_device(config.device)
    return config


def command_for(opts: GlobalOptions, verb: list[str], prompts: Path, encoding: Encoding) -> str:
    """A copy-pasteable command with the same model and the encoding options that select the cache keys."""
    words = ["sdxl-split", "--model", opts.model, *verb, str(prompts)]
    if encoding.negative_prompt is not None:
        words += ["--negative-prompt", encoding.negative_prompt]
    if encoding.clip_skip:
        words += ["--clip-skip", str(encoding.clip_skip)]
    if encoding.dtype != "fp32":
        words += ["--encoder-dtype", encoding.dtype]
    if encoding.prompt_syntax != "plain":
        words += ["--prompt-syntax", encoding.prompt_syntax]
    for lora in encoding.loras:
        words += ["--lora", lora]
    for flag, value in (("--lora-dir", encoding.lora_dir), ("--embedding-dir", encoding.embedding_dir)):
        if value is not None:
            words += [flag, str(value)]
    for embedding in encoding.embeddings:
        words += ["--embedding", str(embedding)]
    return shlex.join(words)
