"""Multi-seed tables of a proxy: mean score and paired difference to the reference per setting x budget.

A proxy hands over a `SettingTable`: for every (setting, budget) the per-item hits under each
seed (`stats.SeedHits`) and the visual tokens the language model received. From it:

* `summary_rows`: per (setting, budget) the mean over seeds and items with its standard error,
  and the paired difference to the reference setting *at the same budget* (`stats`), with the
  per-seed differences;
* `summary_markdown`, `summary_csv`, `plot_summary` (score against tokens with ±2 SE bands, and
  the paired difference with ±2 SE bands), `write_summary` (all files, atomically).

Unbudgeted settings (the unmerged model, the no-image floor) have budget None: they get a mean
and no difference.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .files import atomic_write_bytes, atomic_write_text
from .plots import png_bytes, pyplot
from .recommend import decide, verdict_markdown, verdict_to_dict
from .settings import REFERENCE_SETTING
from .stats import SeedHits, mean_estimate, paired_difference

BAND_Z = 2.0  # the plots' bands and the tables' significance marks: ± 2 standard errors


SE_METHOD = (
    "crossed seeds x items standard error of the mean (two-way random effects, ANOVA estimates clamped at 0): "
    "var(seed)/S + var(item)/I + var(residual)/(S I); differences paired by seed and item "
    "(pitome_mllm.experiments.proxy.stats)"
)


@dataclass
class SettingTable:
    """Per-item hits of a proxy over seeds.

    Attributes:
        hits: ``{(setting, budget or None): {seed: {item: hit}}}``.
        tokens: ``{(setting, budget): visual tokens per image}`` (mean over seeds).
        order: settings in display order (others are shown after them, by name).
        score: what a hit is (``"easy-VQA accuracy"``, ``"probe accuracy, plain pool"``).
    """

    hits: dict[tuple[str, int | None], dict[int, dict[int, float]]]
    tokens: dict[tuple[str, int | None], float]
    order: Sequence[str]
    score: str

    def settings(self) -> list[str]:
        names = {setting for setting, _ in self.hits}
        position = {name: index for index, name in enumerate(self.order)}
        return sorted(names, key=lambda name: (position.get(name, len(position)), name))

    def budgets(self) -> list[int]:
        return sorted({budget for _, budget in self.hits if budget is not None}, reverse=True)

    def all_seeds(self) -> list[int]:
        """Every seed any setting was measured with."""
        return sorted({seed for hits in self.hits.values() for seed in hits})

    def by_budget(self, complete: bool = False) -> dict[int, dict[str, SeedHits]]:
        """``{budget: {setting: hits}}`` (budgeted settings only), as `recommend.decide` takes it.

        With ``complete``, only cells measured under every seed of `all_seeds` (a cell with
        fewer seeds would enter a comparison with an error that misses the seed variance).
        """
        seeds = set(self.all_seeds())
        table: dict[int, dict[str, SeedHits]] = {}
        for (setting, budget), hits in self.hits.items():
            if budget is not None and (not complete or set(hits) == seeds):
                table.setdefault(budget, {})[setting] = hits
        return table

    def incomplete(self) -> list[tuple[str, int | None, list[int]]]:
        """``(setting, budget, seeds)`` of every cell measured under fewer than all seeds."""
        seeds = self.all_seeds()
        return [
            (setting, budget, sorted(hits)) for (setting, budget), hits in self.hits.items() if len(hits) < len(seeds)
        ]


def summary_rows(table: SettingTable, reference: str) -> list[dict[str, Any]]:
    """One dict per (setting, budget), settings in display order, budgets high to low.

    Keys: ``setting``, ``budget``, ``visual_tokens``, ``mean``, ``se``, ``item_se``, ``seeds``,
    ``items``, ``per_seed`` (the setting's mean per seed), and against ``reference`` at the same
    budget: ``difference``, ``difference_se``, ``difference_item_se``, ``difference_per_seed``,
    ``pairs`` (seeds x items paired); those are None for the reference itself and where it was
    not measured.
    """
    rows = []
    for setting in table.settings():
        for budget in [None, *table.budgets()]:
            key = (setting, budget)
            if key not in table.hits:
                continue
            mean = mean_estimate(table.hits[key])
            row: dict[str, Any] = {
                "setting": setting,
                "budget": budget,
                "visual_tokens": table.tokens.get(key),
                "mean": mean.mean,
                "se": mean.se,
                "item_se": mean.item_se,
                "seeds": list(mean.seeds),
                "items": mean.items,
                "per_seed": list(mean.per_seed),
                "difference": None,
                "difference_se": None,
                "difference_item_se": None,
                "difference_per_seed": None,
                "pairs": None,
            }
            other = table.hits.get((reference, budget))
            if budget is not None and setting != reference and other is not None:
                difference = paired_difference(table.hits[key], other)
                row.update(
                    difference=difference.mean,
                    difference_se=difference.se,
                    difference_item_se=difference.item_se,
                    difference_per_seed=list(difference.per_seed),
                    pairs=len(difference.seeds) * difference.items,
                )
            rows.append(row)
    return rows


def estimate_cell(mean: float, se: float, points: bool = False) -> str:
    """``0.812 ± 0.011`` (or, in points, ``+1.2 ± 0.4``; a ``*`` marks ``|mean| > 2 se``)."""
    if not points:
        return f"{mean:.3f} ± {se:.3f}"
    mark = "*" if abs(mean) > BAND_Z * se else ""
    return f"{100 * mean:+.1f} ± {100 * se:.1f}{mark}"


def markdown_grid(
    rows: Sequence[dict[str, Any]],
    title: str,
    cell: Callable[[dict[str, Any]], str],
    single: Callable[[dict[str, Any]], str] | None = None,
) -> list[str]:
    """Markdown lines: one line per setting, one column per budget (high to low), ``cell(row)`` in each.

    An unbudgeted row (budget None) gets its own line ``setting (N tokens) | single(row)``
    (left out when ``single`` is None); a setting whose cells are all empty is left out. Rows
    with a ``seeds`` list shorter than the table's longest say how many seeds they hold.
    """
    budgets = sorted({row["budget"] for row in rows if row["budget"] is not None}, reverse=True)
    by_key = {(row["setting"], row["budget"]): row for row in rows}
    most_seeds = max((len(row.get("seeds") or ()) for row in rows), default=0)

    def marked(row: dict[str, Any], text: str) -> str:
        count = len(row.get("seeds") or ())
        if not text or not count or count == most_seeds:
            return text
        return f"{text} ({count} seed{'s' if count > 1 else ''})"

    lines = [
        f"| {title} | " + " | ".join(f"{budget} tokens" for budget in budgets) + " |",
        "|---|" + "---:|" * len(budgets),
    ]
    for setting in dict.fromkeys(row["setting"] for row in rows):
        alone = by_key.get((setting, None))
        if alone is not None and single is not None:
            tokens = "" if alone["visual_tokens"] is None else f" ({alone['visual_tokens']:.0f} tokens)"
            lines.append(f"| {setting}{tokens} | {marked(alone, single(alone))} |")
        cells = [
            "" if (setting, budget) not in by_key else marked(by_key[setting, budget], cell(by_key[setting, budget]))
            for budget in budgets
        ]
        if any(cells):
            lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    return lines


def mean_cell(row: dict[str, Any]) -> str:
    return estimate_cell(row["mean"], row["se"])


def difference_cell(row: dict[str, Any]) -> str:
    return "" if row["difference"] is None else estimate_cell(row["difference"], row["difference_se"], True)


def summary_markdown(rows: Sequence[dict[str, Any]], reference: str, score: str) -> str:
    """Two tables: mean ± SE per setting x budget, and the paired difference to ``reference`` (points)."""
    lines = markdown_grid(rows, f"setting ({score}, mean ± SE)", mean_cell, mean_cell)
    lines += ["", *markdown_grid(rows, f"setting − {reference} (points, paired, ± SE)", difference_cell)]
    return "\n".join(lines) + "\n"


def summary_csv(rows: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    columns = list(rows[0]) if rows else []
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: json.dumps(value) if isinstance(value, list) else value for key, value in row.items()})
    return buffer.getvalue()


def plot_summary(rows: Sequence[dict[str, Any]], reference: str, score: str, title: str) -> bytes:
    """PNG: left, mean score against visual tokens (±2 SE bands); right, the paired difference to ``reference``.

    Unbudgeted settings are horizontal lines on the left panel; settings whose method selects
    tokens (`pitome_mllm.config.SELECTION_METHODS`) are dotted.
    """
    plt = pyplot()

    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.get_cmap("tab20").colors
    settings = list(dict.fromkeys(row["setting"] for row in rows))
    for index, setting in enumerate(settings):
        mine = [row for row in rows if row["setting"] == setting]
        color = colors[index % len(colors)]
        single = [row for row in mine if row["budget"] is None]
        if single:
            left.axhline(single[0]["mean"], color="grey", linestyle="--" if index % 2 == 0 else "-.", label=setting)
            continue
        mine = sorted((row for row in mine if row["visual_tokens"] is not None), key=lambda row: row["visual_tokens"])
        style = ":" if is_selection(mine[0].get("method")) else "-"
        x = [row["visual_tokens"] for row in mine]
        for axis, key, error in ((left, "mean", "se"), (right, "difference", "difference_se")):
            points = [
                (tokens, row[key], row[error]) for tokens, row in zip(x, mine, strict=True) if row[key] is not None
            ]
            if not points:
                continue
            plot_with_band(axis, points, label=setting, color=color, linestyle=style)
    right.axhline(0.0, color="black", linewidth=0.8)
    for axis, ylabel in ((left, score), (right, f"{score} − {reference} (paired)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("visual tokens per image (log scale)")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
    left.set_title(f"mean over seeds, bands ± {BAND_Z:g} SE", fontsize=9)
    right.set_title(f"paired difference to {reference} at the same budget, bands ± {BAND_Z:g} SE", fontsize=9)
    handles, labels = left.get_legend_handles_labels()
    figure.legend(handles, labels, loc="center right", fontsize="small")
    figure.suptitle(title)
    figure.tight_layout(rect=(0, 0, 0.86, 1))
    return png_bytes(figure, dpi=110)


def plot_with_band(axis, points: Sequence[tuple[float, float, float]], scale: float = 1.0, **style) -> None:
    """A line through ``(x, y, se)`` points and a band of ±`BAND_Z` SE around it, y scaled by ``scale``."""
    xs, ys, errors = zip(*points, strict=True)
    axis.plot(xs, [scale * y for y in ys], marker="o", markersize=4, **style)
    low = [scale * (y - BAND_Z * e) for y, e in zip(ys, errors, strict=True)]
    high = [scale * (y + BAND_Z * e) for y, e in zip(ys, errors, strict=True)]
    axis.fill_between(xs, low, high, color=style.get("color"), alpha=0.12, linewidth=0)


def is_selection(method: str | None) -> bool:
    from ...config import SELECTION_METHODS

    return method in SELECTION_METHODS


def write_summary(
    output: Path,
    stem: str,
    table: SettingTable,
    reference: str,
    title: str,
    extra: Mapping[str, Any],
    methods: Mapping[str, str] | None = None,
) -> dict[str, Path]:
    """``<stem>.md`` / ``.csv`` / ``.json`` / ``.png`` in ``output`` (each written atomically).

    ``methods`` maps a setting to its `PiToMeConfig` method (for the plot's line styles).
    """
    rows = summary_rows(table, reference)
    if not rows:
        raise ValueError(f"nothing to summarise for {stem}")
    for row in rows:
        row["method"] = (methods or {}).get(row["setting"])
    paths = {name: Path(output) / f"{stem}.{name}" for name in ("md", "csv", "json", "png")}
    atomic_write_text(paths["md"], summary_markdown(rows, reference, table.score))
    atomic_write_text(paths["csv"], summary_csv(rows))
    payload = {**extra, "score": table.score, "reference": reference, "se": SE_METHOD, "rows": rows}
    atomic_write_text(paths["json"], json.dumps(payload, indent=1) + "\n")
    atomic_write_bytes(paths["png"], plot_summary(rows, reference, table.score, title))
    return paths


def write_seed_summaries(
    output: Path,
    tables: Mapping[str, SettingTable],
    titles: Mapping[str, str],
    extra: Mapping[str, Any],
    methods: Mapping[str, str],
) -> dict[str, Path]:
    """`write_summary` of each ``{stem: table}`` against `REFERENCE_SETTING`; returns the first one's paths."""
    written = [
        write_summary(output, stem, table, REFERENCE_SETTING, titles[stem], extra, methods)
        for stem, table in tables.items()
    ]
    return written[0]


# ------------------------------------------------------------------------ both proxies together
COMBINED_STEM = "proxy_summary"


def compact_table(rows: Sequence[dict[str, Any]], reference: str, title: str) -> list[str]:
    """Markdown lines: per setting x budget ``mean (difference to reference ± SE)``.

    The reference's cells give its mean ± SE in bold; a ``*`` marks a difference beyond ±2 SE.
    """

    def cell(row: dict[str, Any]) -> str:
        if row["setting"] == reference:
            return f"**{mean_cell(row)}**"
        if row["difference"] is None:
            return f"{row['mean']:.3f}"
        return f"{row['mean']:.3f} ({difference_cell(row)})"

    return markdown_grid(rows, title, cell, mean_cell)


def write_combined(
    output: Path,
    tables: Mapping[str, SettingTable],
    *,
    candidate: str,
    reference: str,
    rivals: Sequence[str],
    methods: Mapping[str, str],
    extra: Mapping[str, Any],
) -> dict[str, Path]:
    """``proxy_summary.md`` / ``.json`` / ``.png``: both proxies' tables and the per-budget verdict.

    Args:
        tables: proxy name -> its `SettingTable`.
        methods: setting -> `PiToMeConfig` method; settings whose method is a selection method
            are the selection rivals of rule 1 (`recommend`), every budgeted setting may be recommended.
    """
    order = list(dict.fromkeys(name for table in tables.values() for name in table.settings()))
    budgeted = {name for table in tables.values() for cells in table.by_budget().values() for name in cells}
    recommendable = [name for name in order if name in budgeted]
    selection = [name for name in order if is_selection(methods.get(name))]
    verdicts = decide(
        {proxy: table.by_budget(complete=True) for proxy, table in tables.items()},
        recommendable,
        candidate=candidate,
        reference=reference,
        rivals=rivals,
        selection=selection,
        z=BAND_Z,
    )
    all_rows = {proxy: summary_rows(table, reference) for proxy, table in tables.items()}
    lines = []
    for proxy, rows in all_rows.items():
        lines += compact_table(rows, reference, f"{proxy}: {tables[proxy].score} (− {reference}, points ± SE)")
        lines.append("")
    lines.append(verdict_markdown(verdicts, BAND_Z))
    paths = {name: Path(output) / f"{COMBINED_STEM}.{name}" for name in ("md", "json", "png")}
    atomic_write_text(paths["md"], "\n".join(lines))
    payload = {
        **extra,
        "se": SE_METHOD,
        "rule": {"candidate": candidate, "reference": reference, "rivals": list(rivals), "selection": selection},
        "left_out_of_the_verdict": {
            proxy: [{"setting": s, "budget": b, "seeds": seeds} for s, b, seeds in table.incomplete()]
            for proxy, table in tables.items()
        },
        "verdicts": [verdict_to_dict(verdict) for verdict in verdicts],
        "proxies": {proxy: {"score": tables[proxy].score, "rows": rows} for proxy, rows in all_rows.items()},
    }
    atomic_write_text(paths["json"], json.dumps(payload, indent=1) + "\n")
    atomic_write_bytes(paths["png"], plot_differences(all_rows, tables, reference, methods))
    return paths


def plot_differences(
    all_rows: Mapping[str, Sequence[dict[str, Any]]],
    tables: Mapping[str, SettingTable],
    reference: str,
    methods: Mapping[str, str],
) -> bytes:
    """PNG: one panel per proxy, each setting's paired difference to ``reference`` against tokens (±2 SE bands)."""
    plt = pyplot()

    figure, axes = plt.subplots(1, len(all_rows), figsize=(6.5 * len(all_rows), 5), squeeze=False)
    colors = plt.get_cmap("tab20").colors
    names = list(dict.fromkeys(row["setting"] for rows in all_rows.values() for row in rows))
    for axis, (proxy, rows) in zip(axes[0], all_rows.items(), strict=True):
        for setting in names:
            points = sorted(
                (row["visual_tokens"], row["difference"], row["difference_se"])
                for row in rows
                if row["setting"] == setting and row["difference"] is not None and row["visual_tokens"] is not None
            )
            if not points:
                continue
            color = colors[names.index(setting) % len(colors)]
            style = ":" if is_selection(methods.get(setting)) else "-"
            plot_with_band(axis, points, scale=100.0, label=setting, color=color, linestyle=style)
        axis.axhline(0.0, color="black", linewidth=0.8)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("visual tokens per image (log scale)")
        axis.set_ylabel(f"points of {tables[proxy].score} − {reference}")
        axis.set_title(f"{proxy} (paired, bands ± {BAND_Z:g} SE; dotted: selection methods)", fontsize=9)
        axis.grid(alpha=0.3)
    handles: dict[str, Any] = {}
    for axis in axes[0]:
        for handle, label in zip(*axis.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    figure.legend(list(handles.values()), list(handles), loc="center right", fontsize="small")
    figure.tight_layout(rect=(0, 0, 0.85, 1))
    return png_bytes(figure, dpi=110)
