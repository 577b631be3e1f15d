"""What a run has left to do, decided before any process or Ray starts: one job per distinct piece of work,
less the jobs whose images are all in --out with the bytes the manifest recorded for them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sdxl_split.denoiser_service.config import RenderConfig
from sdxl_split.denoiser_service.naming import ModelIdentity, batch_files
from sdxl_split.denoiser_service.outputs import OutputDir
from sdxl_split.shared.digests import intact
from sdxl_split.shared.encoding_settings import EncodingSettings, entry_key
from sdxl_split.shared.jobs import job_id_for
from sdxl_split.shared.prompt_extras import ExtrasResolver
from sdxl_split.shared.prompts import PromptEntry


@dataclass(frozen=True)
class JobFiles:
    job_id: str
    entry: PromptEntry
    files: tuple[str, ...]


@dataclass
class Plan:
    todo: list[JobFiles] = field(default_factory=list)
    # Images already in --out, intact, that this run keeps.
    done_images: int = 0
    # Lines that ask for the same work as an earlier line (same embeddings, seed, count and LoRAs).
    repeated_lines: int = 0
    # Finished images whose bytes no longer match the manifest, renamed *.corrupt and rendered again.
    set_aside: list[Path] = field(default_factory=list)

    @property
    def todo_images(self) -> int:
        return sum(len(job.files) for job in self.todo)

    def warnings(self) -> list[str]:
        return [f"warning: {path.name[:-len('.corrupt')]} no longer has the bytes the manifest lists; renamed to "
                f"{path.name} and rendered again" for path in self.set_aside]


def _intact(out: OutputDir, name: str, recorded: dict[str, str], plan: Plan) -> bool:
    """The file is there with the bytes the manifest lists (or is not listed yet: a rename is atomic, so a file
    that exists is whole, and the denoiser adds its manifest line when it adopts it)."""
    path = out.root / name
    if not path.is_file():
        return False
    if name not in recorded or intact(path, recorded[name]):
        return True
    aside = path.with_name(path.name + ".corrupt")
    path.replace(aside)
    plan.set_aside.append(aside)
    return False


def distinct_jobs(entries: tuple[PromptEntry, ...], settings: EncodingSettings, extras: ExtrasResolver,
                  config: RenderConfig, model: ModelIdentity) -> tuple[list[JobFiles], int]:
    """One job per distinct piece of work, with its image names, and how many lines repeated an earlier one.
    Names derive from the embedding key, a hash of the prompt and settings, so nothing needs encoding."""
    jobs: list[JobFiles] = []
    seen: set[str] = set()
    for entry in entries:
        resolved = extras.resolve(entry)
        key = entry_key(entry, settings, resolved)
        job_id = job_id_for(key, entry.seed, entry.count, resolved.unet_loras)
        if job_id not in seen:
            seen.add(job_id)
            jobs.append(JobFiles(job_id=job_id, entry=entry,
                                   files=batch_files(key, entry, config, model, resolved.unet_loras)[3]))
    return jobs, len(entries) - len(jobs)


def check_jobs(jobs: list[JobFiles], repeated_lines: int, config: RenderConfig) -> Plan:
    """Each job's images by name and manifest hash; a job missing any becomes work to do."""
    out = OutputDir(config.out_dir)
    recorded = out.recorded_digests()
    plan = Plan(repeated_lines=repeated_lines)
    for job in jobs:
        intact = [name for name in job.files if _intact(out, name, recorded, plan)]
        if len(intact) == len(job.files):
            plan.done_images += len(job.files)
        else:
            plan.todo.append(job)
    return plan


def plan_jobs(entries: tuple[PromptEntry, ...], settings: EncodingSettings, extras: ExtrasResolver,
              config: RenderConfig, model: ModelIdentity) -> Plan:
    """What is left to do: the distinct jobs, less those whose images are all in --out, intact."""
    return check_jobs(*distinct_jobs(entries, settings, extras, config, model), config)
