"""Results of the ingest benchmark and their Markdown tables."""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, field


@dataclass
class Result:
    """One measurement of the ceiling (asyncpg straight to the database) or of the service over HTTP."""

    section: str
    variant: str
    target: str
    batch_size: int
    uploaders: int
    rows_per_s: float
    batches_per_s: float
    p50_ms: float
    p99_ms: float
    seconds: float
    rows_sent: int
    inserted: int
    stored: int
    errors: int
    peak_rss_mib: float | None = None
    # CPU seconds in the timed part per group of processes: bench, postgres, service, redis.
    cpu_s: dict[str, float] = field(default_factory=dict)

    def cpu_us_per_batch(self, group: str) -> str:
        if group not in self.cpu_s or not self.batches_per_s:
            return "n/a"
        return f"{self.cpu_s[group] / (self.batches_per_s * self.seconds) * 1e6:,.0f}"

    @property
    def cores_busy(self) -> float:
        return sum(self.cpu_s.values()) / self.seconds if self.seconds else 0.0

    @property
    def counts_match(self) -> bool:
        """Whether every row sent was acknowledged as inserted and is in p1_samples."""
        return self.errors == 0 and self.rows_sent == self.inserted == self.stored


def pairs(results: list[Result], section: str) -> list[tuple[Result, Result]]:
    """Return (ceiling, service) pairs of a section, in the order they were measured."""
    ceilings: dict[tuple, Result] = {}
    found = []
    for result in results:
        if result.section != section:
            continue
        key = (result.variant, result.batch_size, result.uploaders)
        if result.target == "ceiling":
            ceilings[key] = result
        elif key in ceilings:
            found.append((ceilings.pop(key), result))
    return found


def ratio(service: Result, ceiling: Result) -> float:
    return service.rows_per_s / ceiling.rows_per_s if ceiling.rows_per_s else 0.0


def counts_cell(*results: Result) -> str:
    """Return 'rows sent = inserted = stored' for the results, or what differs."""
    sent = sum(result.rows_sent for result in results)
    inserted = sum(result.inserted for result in results)
    stored = sum(result.stored for result in results)
    errors = sum(result.errors for result in results)
    if all(result.counts_match for result in results):
        return f"{sent:,} ok"
    return f"MISMATCH sent {sent:,} inserted {inserted:,} stored {stored:,} errors {errors}"


def rss_cell(result: Result) -> str:
    return f"{result.peak_rss_mib:.0f}" if result.peak_rss_mib is not None else "n/a"


def pair_table(results: list[Result], section: str, with_variant: bool = False) -> list[str]:
    """Return Markdown lines of a table of ceiling/service pairs with their ratio."""
    head = ["batch", "uploaders", "ceiling rows/s", "service rows/s", "ratio", "service req/s",
            "p50 ms", "p99 ms", "ceiling p50/p99 ms", "peak RSS MiB", "rows sent = inserted = stored"]
    if with_variant:
        head.insert(0, "variant")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for ceiling, service in pairs(results, section):
        cells = [
            f"{service.batch_size:,}", str(service.uploaders),
            f"{ceiling.rows_per_s:,.0f}", f"{service.rows_per_s:,.0f}", f"**{ratio(service, ceiling):.2f}**",
            f"{service.batches_per_s:,.0f}", f"{service.p50_ms:.1f}", f"{service.p99_ms:.1f}",
            f"{ceiling.p50_ms:.1f} / {ceiling.p99_ms:.1f}", rss_cell(service), counts_cell(ceiling, service),
        ]
        if with_variant:
            cells.insert(0, service.variant)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_path_table(results: list[Result]) -> list[str]:
    """Return Markdown lines comparing write functions, in batches/s, relative to the first variant."""
    grouped: dict[tuple[int, int], dict[str, Result]] = defaultdict(dict)
    variants: list[str] = []
    for result in results:
        if result.section != "write path":
            continue
        grouped[(result.batch_size, result.uploaders)][result.variant] = result
        if result.variant not in variants:
            variants.append(result.variant)
    if not variants:
        return []
    head = ["batch", "uploaders", *(f"{variant} batches/s" for variant in variants), "rows sent = inserted = stored"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (batch_size, uploaders), by_variant in grouped.items():
        base = by_variant.get(variants[0])
        cells = [f"{batch_size:,}", str(uploaders)]
        for variant in variants:
            result = by_variant.get(variant)
            if result is None:
                cells.append("-")
                continue
            relative = f" ({result.batches_per_s / base.batches_per_s:.2f}x)" if base and base.batches_per_s else ""
            cells.append(f"{result.batches_per_s:,.0f}{relative}")
        cells.append(counts_cell(*by_variant.values()))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def growth_table(results: list[Result]) -> list[str]:
    """Return Markdown lines comparing rates into the empty and the pre-filled table."""
    before = {(r.target, r.batch_size, r.uploaders): r for r in results if r.section == "growth, empty table"}
    after = {(r.target, r.batch_size, r.uploaders): r for r in results if r.section == "growth, pre-filled table"}
    head = ["target", "batch", "uploaders", "empty rows/s", "pre-filled rows/s", "pre-filled / empty",
            "p99 ms empty / pre-filled", "rows sent = inserted = stored"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, empty in before.items():
        filled = after.get(key)
        if filled is None:
            continue
        change = filled.rows_per_s / empty.rows_per_s if empty.rows_per_s else 0.0
        lines.append("| " + " | ".join([
            empty.target, f"{empty.batch_size:,}", str(empty.uploaders), f"{empty.rows_per_s:,.0f}",
            f"{filled.rows_per_s:,.0f}", f"**{change:.2f}**", f"{empty.p99_ms:.1f} / {filled.p99_ms:.1f}",
            counts_cell(empty, filled),
        ]) + " |")
    return lines


def cpu_table(results: list[Result], section: str = "main") -> list[str]:
    """Return Markdown lines of the CPU time per batch of each process group, ceiling against service."""
    head = ["batch", "uploaders", "ceiling: driver", "ceiling: postgres", "ceiling: cores busy",
            "service: load generator", "service: uvicorn", "service: postgres", "service: redis",
            "service: cores busy"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for ceiling, service in pairs(results, section):
        lines.append("| " + " | ".join([
            f"{service.batch_size:,}", str(service.uploaders),
            ceiling.cpu_us_per_batch("bench"), ceiling.cpu_us_per_batch("postgres"), f"{ceiling.cores_busy:.2f}",
            service.cpu_us_per_batch("bench"), service.cpu_us_per_batch("service"),
            service.cpu_us_per_batch("postgres"), service.cpu_us_per_batch("redis"), f"{service.cores_busy:.2f}",
        ]) + " |")
    return lines


def default_pairs(results: list[Result], pool_size: int) -> dict[tuple[int, int], list[tuple[str, float]]]:
    """Return, per (batch size, uploaders), the ratio of every pair measured with the default settings.

    The main table, the empty-table growth check, the pool row of the default
    pool size, uvloop + httptools and one worker all run the same
    configuration, because uvicorn picks uvloop and httptools when both are
    installed. Their spread within one run shows the noise of the machine.
    """
    default_variants = {
        "main": "default", "growth, empty table": "default", "pool": f"pool {pool_size}",
        "server": "uvloop + httptools", "workers": "1 worker",
    }
    found: dict[tuple[int, int], list[tuple[str, float]]] = defaultdict(list)
    for section, variant in default_variants.items():
        for ceiling, service in pairs(results, section):
            if service.variant == variant:
                found[(service.batch_size, service.uploaders)].append((section, ratio(service, ceiling)))
    return found


def repeat_table(results: list[Result], pool_size: int) -> list[str]:
    """Return Markdown lines of the ratios of the same default configuration measured in several sections."""
    found = {key: values for key, values in default_pairs(results, pool_size).items() if len(values) > 1}
    if not found:
        return []
    lines = ["| batch | uploaders | ratios (section) | median | spread |", "|---|---|---|---|---|"]
    for (batch_size, uploaders), values in sorted(found.items()):
        ratios = [value for _, value in values]
        listed = ", ".join(f"{value:.2f} ({section})" for section, value in values)
        lines.append(
            f"| {batch_size:,} | {uploaders} | {listed} | **{statistics.median(ratios):.2f}** | "
            f"{min(ratios):.2f} to {max(ratios):.2f} |"
        )
    return lines
