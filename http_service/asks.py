"""What an HTTP request asks for, checked against the bounds every other way in shares (the CLI's, the wire's), and
turned into the engine's Generation: one job per batch, image i of the request at seed + i."""

from __future__ import annotations

from dataclasses import dataclass

from sdxl_split.encoder_service.serve_loop import Generation
from sdxl_split.shared.encoding_settings import MAX_CLIP_SKIP
from sdxl_split.shared.image_settings import (
    MAX_STEPS,
    JobOptions,
    JobSettings,
    batch_problem,
    guidance_problem,
    scheduler_problem,
    side_problem,
    steps_problem,
)
from sdxl_split.shared.prompts import (
    MAX_COUNT,
    MAX_SEED,
    MAX_TEXT_CHARS,
    RANDOM_SEED,
    PromptEntry,
    random_seed,
    seed_range_problem,
)

MAX_IMAGES_PER_REQUEST = MAX_COUNT


class FieldProblem(ValueError):
    """A request field that cannot be served: which one, and why (answered as HTTP 422)."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name


@dataclass(frozen=True)
class Defaults:
    """What a request that does not say gets: the server's own render options."""

    width: int
    height: int
    steps: int
    guidance: float
    scheduler: str
    syntax: str
    preview_every: int


@dataclass(frozen=True)
class Ask:
    """A request, checked: every field set (from the request or the server's defaults)."""

    prompt: str
    negative_prompt: str | None
    seed: int
    batch_size: int
    batches: int
    settings: JobSettings
    clip_skip: int | None = None
    preview_every: int = 0

    @property
    def seeds(self) -> list[int]:
        return [self.seed + n for n in range(self.batch_size * self.batches)]

    def generation(self, request_id: str, syntax: str) -> Generation:
        entries = tuple(PromptEntry(line=n + 1, prompt=self.prompt, negative_prompt=self.negative_prompt,
                                    seed=self.seed + n * self.batch_size, count=self.batch_size, syntax=syntax)
                        for n in range(self.batches))
        return Generation(request_id, entries, JobOptions(self.settings, self.preview_every, return_images=True),
                          self.clip_skip)


def _check(problem: str | None, field_name: str) -> None:
    if problem:
        raise FieldProblem(field_name, problem)


def _text(value: str | None, field_name: str, required: bool) -> str | None:
    if value is None or not value.strip():
        if required:
            raise FieldProblem(field_name, f"{field_name} must not be empty")
        return None
    if len(value) > MAX_TEXT_CHARS:
        raise FieldProblem(field_name, f"{field_name} is {len(value)} characters; the limit is {MAX_TEXT_CHARS}")
    if "\x00" in value:
        raise FieldProblem(field_name, f"{field_name} holds a NUL character")
    return value.strip()


def check_ask(fields: dict, defaults: Defaults, names: dict[str, str]) -> Ask:
    """`fields`: prompt, negative_prompt, seed, batch_size, batches, width, height, steps, guidance, scheduler,
    clip_skip (None: the server's default); `names`: what the request calls each (for the 422's field)."""
    named = {key: names.get(key, key) for key in fields}
    prompt = _text(fields["prompt"], named["prompt"], required=True)
    negative = _text(fields.get("negative_prompt"), named.get("negative_prompt", "negative_prompt"), required=False)
    width = defaults.width if fields.get("width") is None else fields["width"]
    height = defaults.height if fields.get("height") is None else fields["height"]
    steps = defaults.steps if fields.get("steps") is None else fields["steps"]
    guidance = defaults.guidance if fields.get("guidance") is None else fields["guidance"]
    scheduler = fields.get("scheduler") or defaults.scheduler
    batch, batches = fields.get("batch_size") or 1, fields.get("batches") or 1
    _check(side_problem(width, "width"), named.get("width", "width"))
    _check(side_problem(height, "height"), named.get("height", "height"))
    _check(steps_problem(steps), named.get("steps", "steps"))
    _check(guidance_problem(guidance), named.get("guidance", "guidance"))
    _check(scheduler_problem(scheduler), named.get("scheduler", "scheduler"))
    for value, name in ((batch, "batch_size"), (batches, "batches")):
        if not 1 <= value <= MAX_IMAGES_PER_REQUEST:
            raise FieldProblem(named.get(name, name), f"{named.get(name, name)} {value} must be from 1 to "
                                                      f"{MAX_IMAGES_PER_REQUEST}")
    if batch * batches > MAX_IMAGES_PER_REQUEST:
        raise FieldProblem(named.get("batches", "batches"), f"{batch * batches} images in one request; at most "
                                                             f"{MAX_IMAGES_PER_REQUEST}")
    _check(batch_problem(width, height, batch), named.get("batch_size", "batch_size"))
    seed = fields.get("seed")
    seed = random_seed() if seed is None or seed == RANDOM_SEED else seed  # -1: any seed, to A1111 and OpenAI
    if not 0 <= seed <= MAX_SEED:
        raise FieldProblem(named.get("seed", "seed"), f"seed {seed} must be -1 (random) or from 0 to {MAX_SEED}")
    _check(seed_range_problem(seed, batch * batches), named.get("seed", "seed"))
    clip_skip = fields.get("clip_skip")
    if clip_skip is not None and not 0 <= clip_skip <= MAX_CLIP_SKIP:
        raise FieldProblem(named.get("clip_skip", "clip_skip"), f"clip skip {clip_skip} must be from 0 to "
                                                                f"{MAX_CLIP_SKIP}")
    preview = fields.get("preview_every", defaults.preview_every)
    return Ask(prompt, negative, seed, batch, batches, JobSettings(width, height, steps, float(guidance), scheduler),
               clip_skip or None, min(max(0, preview), MAX_STEPS))
