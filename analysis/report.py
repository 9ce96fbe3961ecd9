"""One self-contained HTML page per sweep (figures embedded): the grid, the fitted laws with their intervals,
every figure the data support (and why the others are missing), and the runs table.
`sae-scaling figures results/<sweep>` writes it beside the figures as report.html."""
from __future__ import annotations

import base64
import html
from pathlib import Path

from analysis.figures import render_all
from analysis.results import Sweeps, load_runs, sweep_dirs
from analysis.sweep_fits import sweep_fits
from sae_core.errors import DataError
from sae_core.io import write_text_atomic

RUN_COLUMNS = ["run_id", "arch", "layer", "n_latents", "k", "l1_coeff", "lr", "seed", "status", "nmse", "l0",
               "dead_frac", "downstream_metric", "downstream_loss", "ce_loss_score", "tokens", "flops", "wall_seconds"]
# a page no wider than the window: wide tables and the grid scroll inside their own box
_STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}
th{background:#f3f3f3}pre{background:#f7f7f7;padding:1em;font-size:12px;overflow-x:auto}img{max-width:100%}
figure{margin:1.5em 0}figcaption{font-size:13px;color:#555}"""


def write_report(sweep_dir: Sweeps, out: str | Path | None = None, all_runs: bool = False) -> Path:
    """Several sweep folders: one report of their runs together, written to `out` (required)."""
    dirs = sweep_dirs(sweep_dir)
    if out is None and len(dirs) > 1:
        raise DataError("figures of several sweeps: give the folder to write them to (--out)")
    out = Path(out) if out else dirs[0] / "figures"
    fits, skipped = sweep_fits(dirs, all_runs)  # fits.json when current: the report, figures and `fit` agree
    figures = render_all(dirs, out, fits=(fits, skipped), all_runs=all_runs)
    runs = load_runs(dirs, all_runs)
    esc = html.escape
    title = ("Sweep " if len(dirs) == 1 else "Sweeps ") + ", ".join(d.name for d in dirs)
    parts = [f"<!doctype html><meta charset='utf-8'><title>{esc(title)}</title><style>{_STYLE}</style>",
             f"<h1>{esc(title)}</h1>",
             f"<p>{len(runs)} runs: " + ", ".join(f"{n} {esc(str(s))}" for s, n in runs.status.value_counts().items())
             + "</p>", "<h2>Grid</h2>"]
    parts += [(f"<h3>{esc(d.name)}</h3>" if len(dirs) > 1 else "") + f"<pre>{esc((d / 'sweep.yaml').read_text())}</pre>"
              for d in dirs if (d / "sweep.yaml").is_file()]
    parts.append("<h2>Fitted laws</h2>")
    if fits:
        parts.append("<div class='scroll'><table><tr><th>law</th><th>fit</th><th>95% intervals</th><th>R²</th>"
                     "<th>points (runs)</th><th>largest held out</th></tr>")
        for name, f in fits.items():
            ci = "<br>".join(f"{esc(k)} [{lo:.3g}, {hi:.3g}]" for k, (lo, hi) in f.ci.items())
            hold = f.holdout.get("max_rel_error") if f.holdout else None
            parts.append(f"<tr><td>{esc(name)}</td><td>{esc(f.formula)}</td><td>{ci}</td><td>{f.r2:.3f}</td>"
                         f"<td>{f.n_points} ({len(f.runs)})</td><td>{'' if hold is None else f'{hold:.1%}'}</td></tr>")
        parts.append("</table></div>")
    else:
        parts.append("<p>No law could be fitted from these runs (the reasons below).</p>")
    parts += [f"<p>{esc(name)}: skipped ({esc(reason)})</p>" for name, reason in skipped.items()]
    parts.append("<h2>Figures</h2>")
    for name, paths, reason in figures:
        if paths is None:
            parts.append(f"<p>{esc(name)}: not drawn ({esc(reason)})</p>")
            continue
        png = next(p for p in paths if Path(p).suffix == ".png")
        data = base64.b64encode(Path(png).read_bytes()).decode()
        parts.append(f"<figure><img src='data:image/png;base64,{data}'><figcaption>{esc(name)}: "
                     f"{esc(str(png))}</figcaption></figure>")
    # the model and sweep columns where they tell the runs apart
    varying = [c for c in ("sweep", "model") if c in runs and runs[c].nunique(dropna=True) > 1]
    cols = varying + [c for c in RUN_COLUMNS if c in runs]
    parts += ["<h2>Runs</h2>", "<div class='scroll'>" + runs[cols].to_html(index=False, float_format=lambda v: f"{v:.4g}",
                                                                       na_rep="") + "</div>"]
    path = out / "report.html"
    write_text_atomic(path, "\n".join(parts))
    return path
