"""The GPU proof's targets (issue 11), read off a finished bench on a GPU at the seed's 1024x1024 workload: each
says what it asks, what the rows measured, and whether it is met, not run, or missed."""

from __future__ import annotations

from collections.abc import Callable

from sdxl_split.bench.results import memory_gib, workload_ms

BEST_ROW_S = 2.5
TINY_VAE_DENOISER_GIB = 6.0
GROUP_OFFLOAD_GIB = 1.5
GROUP_OFFLOAD_SLOWDOWN = 1.5
SPLIT_LATENCY_RATIO = 1.0
TEXT_ENCODERS_GIB = 1.5


def _verdict(ok: bool) -> str:
    return "met" if ok else "missed"


def target_lines(payload: dict) -> list[str]:
    base, env = payload["bench"]["base"], payload["environment"]
    if not env["device"].startswith("cuda") or (base["width"], base["height"]) != (1024, 1024):
        return []
    metric, steps = payload["metric"], base["steps"]
    ok = {r["row"]: r for r in payload["rows"] if r["status"] == "ok"}

    def ms(row: str) -> float | None:
        return workload_ms(ok[row], steps) if row in ok else None

    def gib(row: str) -> float | None:
        return memory_gib(ok[row], metric) if row in ok else None

    table: list[tuple[str, str, str]] = []

    def add(target: str, rows: tuple[str, ...], measure: Callable[[], tuple[str, bool]]) -> None:
        if all(row in ok for row in rows):
            shown, met = measure()
            table.append((target, shown, _verdict(met)))
        else:
            missing = ", ".join(f"`{row}`" for row in rows if row not in ok)
            table.append((target, f"{missing} not run", "not run"))

    timed = [(ms(row), row) for row, r in ok.items() if r["side"] == "denoiser" and ms(row) is not None]
    if timed:
        best_ms, best = min(timed)
        table.append((f"best row <= {BEST_ROW_S} s", f"`{best}` {best_ms / 1000:.2f} s",
                      _verdict(best_ms / 1000 <= BEST_ROW_S)))
    else:
        table.append((f"best row <= {BEST_ROW_S} s", "no denoiser row finished", "not run"))
    for row in ("tiny-vae-slicing", "tiny-vae-slicing-unet-batch"):
        add(f"`{row}` <= {TINY_VAE_DENOISER_GIB} GiB allocated", (row,),
            lambda row=row: (f"{gib(row):.2f} GiB", gib(row) <= TINY_VAE_DENOISER_GIB))
    add(f"`group-offload-tiny` <= {GROUP_OFFLOAD_GIB} GiB", ("group-offload-tiny",),
        lambda: (f"{gib('group-offload-tiny'):.2f} GiB", gib("group-offload-tiny") <= GROUP_OFFLOAD_GIB))
    add(f"`group-offload-tiny` <= {GROUP_OFFLOAD_SLOWDOWN}x `tiny-vae-slicing`'s latency",
        ("group-offload-tiny", "tiny-vae-slicing"),
        lambda: (f"{ms('group-offload-tiny') / ms('tiny-vae-slicing'):.2f}x",
                 ms("group-offload-tiny") / ms("tiny-vae-slicing") <= GROUP_OFFLOAD_SLOWDOWN))
    add(f"split denoiser (`fp16-sdpa`) <= {SPLIT_LATENCY_RATIO:.2f}x the monolith's latency",
        ("fp16-sdpa", "monolith"),
        lambda: (f"{ms('fp16-sdpa') / ms('monolith'):.3f}x", ms("fp16-sdpa") / ms("monolith") <= SPLIT_LATENCY_RATIO))
    add(f"split denoiser holds >= {TEXT_ENCODERS_GIB} GiB less than the monolith", ("fp16-sdpa", "monolith"),
        lambda: (f"{gib('monolith') - gib('fp16-sdpa'):.2f} GiB less",
                 gib("monolith") - gib("fp16-sdpa") >= TEXT_ENCODERS_GIB))
    lines = ["", "## Targets", "", "| target | measured | |", "| --- | --- | --- |"]
    return lines + [f"| {target} | {shown} | {verdict} |" for target, shown, verdict in table]
