"""How every figure looks: the papers' style (Gao et al. 2024 §6, Lawson et al. 2024, Leask et al. 2025), one
fixed color and marker per architecture, log axes labelled the way the papers label them, and the files a
figure is saved as."""
from __future__ import annotations

import functools
import math
import textwrap
from collections.abc import Callable
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib import ticker
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure

from sae_core.io import write_atomic

DPI = 300
STYLE = {
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans", "Arial", "Helvetica"],
    "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 7, "legend.title_fontsize": 7,
    "xtick.labelsize": 8, "ytick.labelsize": 8,
    "axes.grid": True, "axes.grid.which": "major", "grid.alpha": 0.3, "grid.linewidth": 0.5,
    "axes.spines.top": False, "axes.spines.right": False, "axes.linewidth": 0.8,
    "lines.linewidth": 1.4, "lines.markersize": 4.5,
    "legend.frameon": False, "legend.handlelength": 1.8,
    "figure.dpi": 100, "savefig.dpi": DPI, "figure.constrained_layout.use": True,
    "pdf.fonttype": 42, "ps.fonttype": 42,  # editable text in the PDF
    "image.cmap": "viridis",
}
PANEL = (4.6, 3.6)  # inches per panel

# One fixed color (and marker) per architecture, so a family is recognised across figures; a family missing
# here is drawn in OTHER_COLOR.
ARCH_COLORS = {
    "topk": "#1f77b4", "batchtopk": "#17becf", "multi_topk": "#9467bd",
    "relu": "#d62728", "gated": "#2ca02c", "prolu": "#ff7f0e", "prolu-ste": "#ff7f0e", "prolu-relu": "#bcbd22",
    "jumprelu": "#8c564b",
}
ARCH_MARKERS = {"topk": "o", "batchtopk": "s", "multi_topk": "D", "relu": "^", "gated": "v", "prolu": "P",
                "prolu-ste": "P", "prolu-relu": "X", "jumprelu": "*"}
ARCH_ORDER = list(ARCH_COLORS)
OTHER_COLOR = "#7f7f7f"
# the papers' symbols for sparsity keys; any other key is labelled by its name
KEY_SYMBOL = {"k": "k", "l1_coeff": "λ", "target_l0": "target L0", "l0_coeff": "λ₀"}
NMSE = "normalized MSE"


def paper_figure(fn: Callable) -> Callable:
    """Draw under the paper style; a figure function that fails closes whatever it had opened."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        before = set(plt.get_fignums())
        try:
            with plt.rc_context(STYLE):
                fig = fn(*args, **kwargs)
                plain_value_log_ticks(fig)
                return fig
        except BaseException:
            for num in set(plt.get_fignums()) - before:
                plt.close(num)
            raise
    return wrapper


class _PlainLogFormatter(ticker.LogFormatter):
    """Log-axis tick labels as plain numbers (0.3, 0.6) instead of 3×10⁻¹, with LogFormatter's choice of
    which minor ticks to label."""
    def _num_to_string(self, x, vmin, vmax):
        return f"{x:.3g}"


def plain_value_log_ticks(fig: Figure) -> None:
    """Base-10 log axes whose range lies within 1e-3..1e4 get plain-number tick labels."""
    for ax in fig.axes:
        if ax.get_label() == "<colorbar>":
            continue
        for axis in (ax.xaxis, ax.yaxis):
            if axis.get_scale() != "log" or getattr(axis.get_transform(), "base", 10) != 10:
                continue
            lo, hi = axis.get_view_interval()
            if 1e-3 <= min(lo, hi) and max(lo, hi) <= 1e4:
                axis.set_major_formatter(_PlainLogFormatter())
                axis.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))


def subplots(ncols: int = 1, nrows: int = 1, **kw) -> tuple[Figure, np.ndarray]:
    fig, axes = plt.subplots(nrows, ncols, figsize=(PANEL[0] * ncols, PANEL[1] * nrows), squeeze=False, **kw)
    return fig, axes.ravel()


def arch_color(family: str) -> str:
    return ARCH_COLORS.get(family, ARCH_COLORS.get(str(family).split("-")[0], OTHER_COLOR))


def arch_marker(family: str) -> str:
    return ARCH_MARKERS.get(family, ARCH_MARKERS.get(str(family).split("-")[0], "o"))


def family_order(f: str) -> tuple:
    base = f.split("-")[0]
    return (ARCH_ORDER.index(f) if f in ARCH_ORDER else ARCH_ORDER.index(base) if base in ARCH_ORDER
            else len(ARCH_ORDER), f)


def shades(color: str, m: int) -> list[tuple]:
    """m variants of one color, light to dark (series of one architecture, e.g. one per k)."""
    if m == 1:
        return [to_rgb(color)]
    rgb = np.array(to_rgb(color))
    out = []
    for f in np.linspace(-0.55, 0.35, m):
        target = np.ones(3) if f < 0 else np.zeros(3)
        out.append(tuple(rgb + abs(f) * (target - rgb)))
    return out


def sequential_colors(m: int) -> list[tuple]:
    return [tuple(plt.get_cmap("viridis")(x)[:3]) for x in np.linspace(0.05, 0.85, m)] if m > 1 else [to_rgb("#1f77b4")]


def loglog(ax, x: bool = True, y: bool = True) -> None:
    if x:
        ax.set_xscale("log")
    if y:
        ax.set_yscale("log")


def add_legend(ax, outside: bool = False, **kw) -> None:
    """The axes' legend; `outside`: below the figure (long fit formulas), as a figure legend."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return
    if outside:
        ax.figure.legend(handles, [wrap(t) for t in labels], loc="outside lower center", **kw)
    else:
        ax.legend(**kw)


def wrap(text: str, width: int = 90) -> str:
    return "\n".join(textwrap.wrap(text, width, subsequent_indent="    ", break_long_words=False)) or text


def title_with_notes(target, main: str, *notes: str) -> None:
    """A title, and below it in one line the notes (what was left out) that apply."""
    notes = "; ".join(n for n in notes if n)
    text = main + (f"\n{notes}" if notes else "")
    (target.suptitle if isinstance(target, Figure) else target.set_title)(text)


def log2_axis(axis, fmt: Callable[[float], str] | None = None, numticks: int = 8, values=None) -> None:
    """A log axis (base 2) for widths, L0 and learning rates: ticks at the measured `values` when there are at
    most 10 of them (e.g. n = 768, 1536, ...), else at powers of 2; labelled by `fmt` (default: widths)."""
    set_scale = axis.axes.set_xscale if axis is axis.axes.xaxis else axis.axes.set_yscale
    set_scale("log", base=2)
    axis.set_major_locator(ticker.LogLocator(base=2, numticks=numticks))
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: (fmt or n_label)(v)))
    axis.set_minor_locator(ticker.NullLocator())
    if values is not None:
        values = np.unique(np.asarray(values, float)[np.isfinite(np.asarray(values, float))])
        if 1 < len(values) <= 10:
            axis.set_major_locator(ticker.FixedLocator(values))


# ---------------------------------------------------------------- labels

def fmt_value(v) -> str:
    """A grid value for a label: 32, 0.0017, 1.5e+04."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)) or pd.isna(v):
        return "–"
    if isinstance(v, str):
        return v
    v = float(v)
    return str(int(v)) if v.is_integer() and abs(v) < 1e6 else f"{v:.3g}"


def si(v: float) -> str:
    """16000000 -> 16M (token counts on points)."""
    if not np.isfinite(v):
        return ""
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{unit}"
    return f"{v:.3g}"


def n_label(n: float) -> str:
    """A width: 4096, or 2¹⁷ for powers of two from 2¹⁴ on (the papers' notation)."""
    n = int(n)
    if n >= 2 ** 14 and n & (n - 1) == 0:
        return "2" + str(n.bit_length() - 1).translate(str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹"))
    return str(n)


def key_symbol(key: str) -> str:
    return KEY_SYMBOL.get(key, key)


def key_label(key: str, value) -> str:
    """A sparsity setting as the papers write it: k=32, λ=0.003."""
    return f"{key_symbol(key)}={fmt_value(value)}"


# ---------------------------------------------------------------- files

def save_figure(fig: Figure, out_dir: str | Path, name: str) -> list[Path]:
    """<out_dir>/<name>.png (300 dpi) and .pdf, each written under a temporary name and renamed."""
    paths = []
    for fmt in ("png", "pdf"):
        path = Path(out_dir) / f"{name}.{fmt}"
        write_atomic(path, lambda tmp, fmt=fmt: fig.savefig(tmp, format=fmt, dpi=DPI, bbox_inches="tight",
                                                             metadata={"CreationDate": None} if fmt == "pdf" else None))
        paths.append(path)
    return paths
