"""What adapters are, and how they relate: per module and per layer each adapter's delta norm
and effective rank; for every pair, the cosine of their deltas (overall, per layer, per module)
and the overlap of their output and input subspaces against chance. Computed from the factors
(no dense deltas), printed as tables and drawn as heatmaps.

    report = inspect(["a", "b"], png="overlap.png"); print(format_inspect(report))

A report or plot never overwrites an input or a file this command did not write
(``check_report_path``): the PNG carries a text chunk saying who wrote it, the JSON its keys.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from character_training.adapters.algebra import (effective_rank, inner_product, numerical_rank, one_thread,
                                                 svd_factors)
from character_training.adapters.io import (Adapter, AdapterLike, as_adapter, check_compatible, layer_label,
                                            module_layer, module_type, rank_range)
from character_training.errors import UserError

PNG_KEY, PNG_VALUE = "character-training", "adapters inspect"  # a text chunk in the heatmap PNG: ours
_MODULE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class _Spectrum:
    u: torch.Tensor
    s: torch.Tensor
    v: torch.Tensor
    rank: int = field(init=False)

    def __post_init__(self):
        self.rank = numerical_rank(self.s)


def _overlap(x: torch.Tensor, y: torch.Tensor) -> float:
    """||X^T Y||_F^2 / min(k_x, k_y) for orthonormal X, Y: 1 when one space contains the other."""
    k = min(x.shape[1], y.shape[1])
    return float(((x.T @ y) ** 2).sum()) / k if k else 0.0


def inspect(adapters: Sequence[AdapterLike], *, png: str | Path | None = None) -> dict:
    """Per module and per layer: each adapter's delta norm and effective rank; for every pair:
    cosine of the deltas (overall, per layer, per module) and subspace overlap of their output
    and input spaces against chance (a random k-dim subspace overlaps another by max(k)/d)."""
    if not adapters:
        raise UserError("inspect: give at least one adapter directory")
    if png is not None:
        check_report_path(png, "--png", [a.path if isinstance(a, Adapter) else a for a in adapters])
    items = [as_adapter(a) for a in adapters]
    check_compatible(items)
    labels = _unique_labels(items)
    names = sorted({n for a in items for n in a.modules}, key=_module_sort_key)
    with one_thread():
        spectra = [{n: _Spectrum(*svd_factors(f)) for n, f in a.modules.items()} for a in items]
    modules = {}
    for name in names:
        modules[name] = {"layer": module_layer(name), "type": module_type(name), "per_adapter": [
            {"norm": float(sp[name].s.norm()), "rank": items[i].modules[name].rank,
             "effective_rank": effective_rank(sp[name].s)} if name in sp else None
            for i, sp in enumerate(spectra)]}
    layers: dict[str, dict] = {}
    for name, m in modules.items():
        row = layers.setdefault(layer_label(m["layer"]), {"sq": [0.0] * len(items), "erank": [[] for _ in items]})
        for i, entry in enumerate(m["per_adapter"]):
            if entry:
                row["sq"][i] += entry["norm"] ** 2
                row["erank"][i].append(entry["effective_rank"])
    per_layer = [{"layer": layer, "norm": [math.sqrt(x) for x in row["sq"]],
                  "effective_rank": [sum(e) / len(e) if e else 0.0 for e in row["erank"]]}
                 for layer, row in layers.items()]
    summary = []
    for i, a in enumerate(items):
        entries = [m["per_adapter"][i] for m in modules.values() if m["per_adapter"][i]]
        summary.append({"label": labels[i], "path": str(a.path), "sha256": a.sha256, "base_model": a.base_model,
                        "modules": len(entries), "rank": rank_range(a.modules),
                        "norm": math.sqrt(sum(e["norm"] ** 2 for e in entries)),
                        "mean_effective_rank": sum(e["effective_rank"] for e in entries) / len(entries)})
    with one_thread():
        pairs = [_pair_report(i, j, items, spectra, modules)
                 for i in range(len(items)) for j in range(i + 1, len(items))]
    report = {"adapters": summary, "layers": per_layer, "pairs": pairs, "modules": modules}
    if png is not None:
        report["png"] = str(plot_inspect(report, png))
    return report


def _png_is_ours(path: Path) -> bool:
    """Whether a PNG file carries the text chunk ``plot_inspect`` writes."""
    try:
        with path.open("rb") as f:
            if f.read(8) != b"\x89PNG\r\n\x1a\n":
                return False
            while True:
                head = f.read(8)
                if len(head) < 8:
                    return False
                length, kind = int.from_bytes(head[:4], "big"), head[4:]
                if kind == b"IDAT" or kind == b"IEND":  # text chunks this writer puts before the image
                    return False
                data = f.read(length)
                f.read(4)  # CRC
                if kind == b"tEXt" and data == PNG_KEY.encode("latin-1") + b"\0" + PNG_VALUE.encode("latin-1"):
                    return True
    except OSError:
        return False


def _json_is_ours(path: Path) -> bool:
    """Whether a JSON file is an inspect report (what ``--json`` writes)."""
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and {"adapters", "layers", "pairs", "modules"} <= set(data)


def check_report_path(path: str | Path, flag: str, inputs: Sequence) -> None:
    """Refuse a report or plot path that would overwrite an input (a file in an input adapter's
    directory) or a file this command did not write; a directory is refused too."""
    given, path = path, Path(path).expanduser()
    resolved = path.resolve()
    fix = f"choose another {flag} path (a new file name)"
    for item in inputs:
        if item is None:
            continue
        source = Path(item).expanduser().resolve()
        if source == resolved or source in resolved.parents:
            raise UserError(f"{flag} {given}: is in the input adapter {item}; a report never goes into an input "
                            f"(it would overwrite or add to the adapter's files); nothing was changed; {fix}")
    if path.is_dir():
        raise UserError(f"{flag} {given}: is a directory; {flag} names the file to write; {fix}")
    if not path.parent.is_dir():
        raise UserError(f"{flag} {given}: its directory {path.parent} does not exist; nothing was computed or "
                        f"written; create it first, or {fix}")
    if path.exists():
        ours = _png_is_ours(path) if flag == "--png" else _json_is_ours(path)
        if not ours:
            raise UserError(f"{flag} {given}: already exists and is not a {'heatmap' if flag == '--png' else 'report'} "
                            f"`adapters inspect` wrote; it is never overwritten; nothing was changed; {fix}, or move "
                            "the file away")


def _pair_report(i: int, j: int, items: list[Adapter], spectra: list[dict], modules: dict) -> dict:
    a, b = items[i], items[j]
    dot, sq_a, sq_b = 0.0, 0.0, 0.0
    layer_dot: dict[str, list[float]] = {}
    per_module, out_ov, out_ch, in_ov, in_ch = {}, [], [], [], []
    for name, m in modules.items():
        na = m["per_adapter"][i]["norm"] if m["per_adapter"][i] else 0.0
        nb = m["per_adapter"][j]["norm"] if m["per_adapter"][j] else 0.0
        sq_a += na ** 2
        sq_b += nb ** 2
        acc = layer_dot.setdefault(layer_label(m["layer"]), [0.0, 0.0, 0.0])
        acc[1] += na ** 2
        acc[2] += nb ** 2
        if name not in a.modules or name not in b.modules:
            continue
        d = inner_product(a.modules[name], b.modules[name])
        dot += d
        acc[0] += d
        per_module[name] = d / (na * nb) if na > 0 and nb > 0 else 0.0
        sa, sb = spectra[i][name], spectra[j][name]
        if sa.rank and sb.rank:
            out_dim, in_dim = a.modules[name].shape
            out_ov.append(_overlap(sa.u[:, :sa.rank], sb.u[:, :sb.rank]))
            out_ch.append(min(1.0, max(sa.rank, sb.rank) / out_dim))
            in_ov.append(_overlap(sa.v[:, :sa.rank], sb.v[:, :sb.rank]))
            in_ch.append(min(1.0, max(sa.rank, sb.rank) / in_dim))

    def mean(x):
        return sum(x) / len(x) if x else 0.0

    return {"a": i, "b": j, "cosine": dot / math.sqrt(sq_a * sq_b) if sq_a > 0 and sq_b > 0 else 0.0,
            "shared_modules": len(per_module),
            "output_overlap": mean(out_ov), "output_chance": mean(out_ch),
            "input_overlap": mean(in_ov), "input_chance": mean(in_ch),
            "per_layer_cosine": {layer: (d / math.sqrt(x * y) if x > 0 and y > 0 else 0.0)
                                 for layer, (d, x, y) in layer_dot.items()},
            "per_module_cosine": per_module}


def _module_sort_key(name: str):
    layer = module_layer(name)
    kind = module_type(name)
    order = _MODULE_ORDER.index(kind) if kind in _MODULE_ORDER else len(_MODULE_ORDER)
    return (layer is None, layer if layer is not None else 0, order, name)


def _unique_labels(items: list[Adapter]) -> list[str]:
    paths = [a.path.resolve().parts if a.path else ("adapter",) for a in items]
    for depth in range(1, max(len(p) for p in paths) + 1):
        labels = ["/".join(p[-depth:]) for p in paths]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{i}:{'/'.join(p[-2:])}" for i, p in enumerate(paths)]


def format_inspect(report: dict) -> str:
    """The inspect report as plain-text tables."""
    adapters = report["adapters"]
    width = max(len(a["label"]) for a in adapters)
    lines = [f"{'#':>2}  {'adapter':<{width}}  {'modules':>7}  {'rank':>7}  {'norm':>10}  {'eff. rank':>9}"]
    for i, a in enumerate(adapters):
        r = a["rank"]
        rank = f"{r[0]}" if r[0] == r[1] else f"{r[0]}-{r[1]}"
        lines.append(f"{i:>2}  {a['label']:<{width}}  {a['modules']:>7}  {rank:>7}  {a['norm']:>10.4g}  "
                     f"{a['mean_effective_rank']:>9.2f}")
    lines += ["", "per layer: delta norm / mean effective rank" + (", cosine per pair" if report["pairs"] else "")]
    head = f"{'layer':>5}  " + "  ".join(f"{f'[{i}] norm':>10} {'erank':>6}" for i in range(len(adapters)))
    head += "".join(f"  {'cos[%d,%d]' % (p['a'], p['b']):>9}" for p in report["pairs"])
    lines.append(head)
    for row in report["layers"]:
        line = f"{row['layer']:>5}  " + "  ".join(f"{n:>10.4g} {e:>6.2f}"
                                                for n, e in zip(row["norm"], row["effective_rank"]))
        line += "".join(f"  {p['per_layer_cosine'].get(row['layer'], 0.0):>9.4f}" for p in report["pairs"])
        lines.append(line)
    if report["pairs"]:
        lines += ["", "pairs: cosine of the deltas; subspace overlap ||U_a^T U_b||^2 / min rank, "
                      "against chance max rank / d",
                  f"{'pair':>6}  {'cosine':>8}  {'modules':>7}  {'output overlap (chance)':>24}  "
                  f"{'input overlap (chance)':>23}"]
        for p in report["pairs"]:
            lines.append(f"{p['a']:>2} - {p['b']:<1}  {p['cosine']:>8.4f}  {p['shared_modules']:>7}  "
                         f"{p['output_overlap']:>14.4f} ({p['output_chance']:.4f})  "
                         f"{p['input_overlap']:>13.4f} ({p['input_chance']:.4f})")
    if report.get("png"):
        lines += ["", f"heatmap: {report['png']}"]
    return "\n".join(lines)


def _grid(report: dict, values: Callable[[dict], float | None]):
    """(matrix layers x module types, layer labels, type labels) from a per-module value."""
    import numpy as np

    mods = report["modules"]
    layers = sorted({m["layer"] for m in mods.values()}, key=lambda x: (x is None, x if x is not None else 0))
    types = sorted({m["type"] for m in mods.values()},
                   key=lambda t: (_MODULE_ORDER.index(t) if t in _MODULE_ORDER else len(_MODULE_ORDER), t))
    grid = np.full((len(layers), len(types)), np.nan)
    for name, m in mods.items():
        value = values({"name": name, **m})
        if value is not None:
            grid[layers.index(m["layer"]), types.index(m["type"])] = value
    return grid, [layer_label(x) for x in layers], types


def plot_inspect(report: dict, png: str | Path) -> Path:
    """Heatmaps: each adapter's delta norm per layer and module type; for two or more adapters,
    the pairwise cosine and subspace-overlap matrices and each pair's cosine per layer and module."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(report["adapters"])
    labels = [a["label"] for a in report["adapters"]]
    panels: list[tuple] = []
    for i in range(min(n, 4)):
        grid, rows, cols = _grid(report, lambda m, i=i: m["per_adapter"][i]["norm"] if m["per_adapter"][i] else None)
        panels.append(("map", f"[{i}] {labels[i]}: delta norm", grid, rows, cols, "viridis", None, None))
    if n >= 2:
        cos, overlap = np.eye(n), np.eye(n)
        notes = [["" for _ in range(n)] for _ in range(n)]
        for p in report["pairs"]:
            a, b = p["a"], p["b"]
            cos[a, b] = cos[b, a] = p["cosine"]
            overlap[a, b] = overlap[b, a] = p["output_overlap"]
            notes[a][b] = notes[b][a] = f"{p['output_overlap']:.3g}\n(chance {p['output_chance']:.2g})"
        names = [f"[{i}]" for i in range(n)]
        panels.append(("matrix", "cosine of the deltas", cos, names, names, "coolwarm", (-1.0, 1.0), None))
        panels.append(("matrix", "output subspace overlap", overlap, names, names, "magma", (0.0, 1.0), notes))
        for p in report["pairs"][:3]:
            grid, rows, cols = _grid(report, lambda m, p=p: p["per_module_cosine"].get(m["name"]))
            lim = float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0
            panels.append(("map", f"cosine [{p['a']}] vs [{p['b']}]", grid, rows, cols, "coolwarm",
                           (-lim or -1.0, lim or 1.0), None))
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 4.2 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (kind, title, grid, rows, cols, cmap, lims, notes) in zip(axes.flat, panels):
        image = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=lims[0] if lims else None,
                          vmax=lims[1] if lims else None, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=7)
        step = max(1, len(rows) // 16)
        ax.set_yticks(range(0, len(rows), step), rows[::step], fontsize=7)
        if kind == "map":
            ax.set_ylabel("layer", fontsize=8)
        else:
            for (r, c), value in np.ndenumerate(grid):
                text = notes[r][c] if notes and notes[r][c] else f"{value:.3g}"
                ax.text(c, r, text, ha="center", va="center", fontsize=8,
                        color="white" if cmap == "magma" and value < 0.5 else "black")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle("  ".join(f"[{i}] {label}" for i, label in enumerate(labels)), fontsize=9)
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110, metadata={PNG_KEY: PNG_VALUE})
    plt.close(fig)
    return png
