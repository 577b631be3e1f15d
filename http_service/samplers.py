"""A1111's sampler and scheduler names, as clients send and list them, mapped to the schedulers sdxl-split runs."""

from __future__ import annotations

# A1111 sampler name -> (sdxl-split scheduler for each A1111 schedule type it supports; aliases clients send).
# "automatic" is the sampler's own default: A1111 runs DPM++ 2M with Karras sigmas unless told otherwise.
SAMPLERS: dict[str, tuple[dict[str, str], tuple[str, ...]]] = {
    "Euler": ({"automatic": "euler"}, ("k_euler",)),
    "Euler a": ({"automatic": "euler_a"}, ("k_euler_a", "k_euler_ancestral")),
    "DPM++ 2M": ({"automatic": "dpmpp_2m_karras", "karras": "dpmpp_2m_karras", "uniform": "dpmpp_2m"},
                 ("k_dpmpp_2m",)),
    "DDIM": ({"automatic": "ddim"}, ()),
    "UniPC": ({"automatic": "unipc"}, ()),
}
# name -> label, as /sdapi/v1/schedulers lists them; clients send either.
SCHEDULE_TYPES = {"automatic": "Automatic", "karras": "Karras", "uniform": "Uniform"}
DEFAULT_SAMPLER = "Euler"


class UnknownSampler(ValueError):
    """A sampler, or a sampler and schedule type, this server does not run; the message lists what it does."""


def _schedule(name: str | None) -> str:
    if not name:
        return "automatic"
    for key, label in SCHEDULE_TYPES.items():
        if name.strip().lower() in (key, label.lower()):
            return key
    raise UnknownSampler(f"scheduler {name!r} is not one of {', '.join(SCHEDULE_TYPES.values())}")


def _sampler(name: str) -> tuple[str, str | None]:
    """(A1111 sampler, schedule type it names) for a name such as "DPM++ 2M Karras" or "k_euler"."""
    for sampler, (_, aliases) in SAMPLERS.items():
        if name == sampler or name in aliases:
            return sampler, None
        for key, label in SCHEDULE_TYPES.items():
            if name in (f"{sampler} {label}", f"{sampler} {key}"):
                return sampler, key
    raise UnknownSampler(f"sampler {name!r} is not one of {', '.join(SAMPLERS)}")


def scheduler_for(sampler_name: str | None, scheduler: str | None) -> str:
    """The sdxl-split scheduler that runs what an A1111 client asked for; UnknownSampler when none does."""
    sampler, named = _sampler(sampler_name or DEFAULT_SAMPLER)
    schedule = named or _schedule(scheduler)
    choices = SAMPLERS[sampler][0]
    if schedule not in choices:
        offered = ", ".join(SCHEDULE_TYPES[key] for key in choices)
        raise UnknownSampler(f"sampler {sampler!r} runs with the schedule types {offered}, not "
                             f"{SCHEDULE_TYPES[schedule]}")
    return choices[schedule]


def sampler_items() -> list[dict]:
    """/sdapi/v1/samplers, in A1111's shape."""
    return [{"name": name, "aliases": list(aliases), "options": {}} for name, (_, aliases) in SAMPLERS.items()]


def scheduler_items() -> list[dict]:
    """/sdapi/v1/schedulers, in A1111's shape."""
    rho = {"karras": 7.0}
    return [{"name": key, "label": label, "aliases": None, "default_rho": rho.get(key, -1.0),
             "need_inner_model": False} for key, label in SCHEDULE_TYPES.items()]
