#!/usr/bin/env python
"""Every trainer at its own defaults, on the same vectors: held-out FVU against vectors seen.

bench/peers.py gives the peers our learning rate, so that a quality gap is not a learning-rate one; this asks
what a user gets who changes nothing. TopK, k = 32, on bench/peers.py's synthetic vectors (batches of 4096,
`peers.batch(d, 4096, 10_000 + step)` in every process) or, with --data minilm (d 384 only), on real
activations: the embedded MiniLM-L6's residual stream (bench/minilm_vectors.py, built on first use);
FVU = sum (x - x_hat)^2 / sum (x - mean x)^2 on its held-out 4096 (seed 1), about 4 times a decade of vectors
from the first batch, and at the last. Configs and
default budgets: 384x6144, 2,048,000 vectors (500 steps); 768x24576, 1,003,520 (245). One subprocess per
(config, trainer), the peers in bench/.venv. L0 is not recorded: TopK keeps at most k by construction.
- ours (sae_core TrainConfig defaults, through peers.build_ours): Adam at the TopK family's `lr: horizon`
  (sae_core/config.py), betas 0.9 / 0.999, eps 6.25e-10, constant, no EMA, no clipping; inputs unit_norm
  per token, b_pre the geometric median, tied init with the fitted encoder scale, unit-norm decoder, AuxK 1/32.
- sparsify 1.3.3 (TrainConfig: optimizer "signum", loss_fn "fvu", auxk_alpha 0; trainer.py's fit loop with
  those, step by step): ScheduleFreeWrapper(SignSGD, momentum 0.95), lr 5e-3 / sqrt(n / 2^14), no schedule;
  b_dec = the first batch's mean, decoder rows renormalised before each forward and their parallel gradient
  removed; float32 matmul precision "high" as its fit sets; evaluated at the schedule-free average
  (opt.eval(), the weights it saves).
- SAELens 6.54.12 (SAETrainerConfig and TopKTrainingSAEConfig defaults; its fit loop without logging): Adam
  lr 3e-4, betas 0.9 / 0.999, constant, no warm-up, gradient norm clipped to 1; MSE loss (sum over d, mean
  over the batch); normalize_activations "none", b_dec 0 subtracted from the input, decoder rows at norm 0.1
  with W_enc = W_dec^T, rescale_acts_by_decoder_norm, AuxK (coefficient 1) on latents unfired for 1000 steps,
  more than either budget has.
A worker stops at an eval point rather than run past --budget-s (the table says partial). Prints the machine
first; writes the curves (JSON) and a figure.

Usage: .venv/bin/python bench/quality_defaults.py [--configs 384x6144,768x24576] [--trainers ours,sparsify,saelens]
       [--vectors 384x6144=2048000] [--scale 0.01] [--threads 2] [--budget-s 3600] [--isa avx2] [--plot-only]
       [--data synthetic|minilm] [--add]
Slow: about 1 h at the default budgets on 2 threads of an AVX512-BF16 Xeon (s/step at 384x6144: ours 0.16,
sparsify 0.31, SAELens 0.82; at 768x24576: 0.65, 1.5, 8.2, so SAELens alone ~35 min there).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import peers  # noqa: E402  (bench/peers.py: the data, our trainer, the peer venv)

K, BATCH, PER_DECADE = 32, 4096, 4
CONFIGS = {"384x6144": (384, 6144, 2_048_000), "768x24576": (768, 24576, 1_003_520),
           "384x1536": (384, 1536, 2_048_000)}  # the last: bench/lr_horizon.py's second size, not a default here
TRAINERS = ("ours", "sparsify", "saelens")
FRACTIONS = (0.1, 0.3, 1.0)
DATA = {"synthetic": "bench/peers.py's synthetic vectors (a random dictionary of 16384 unit features, 32 active)",
        "minilm": "the embedded MiniLM-L6's residual stream after block 5 of 6 (bench/minilm_vectors.py)"}
DEFAULTS = {  # the table's header lines; the docstring says where each comes from
    "ours": "Adam at lr: horizon, 2e-4/sqrt(n/2^14) x min({max:g}, max(1, (vectors/{d1:.2g})^-{beta:g})), constant; "
            "unit_norm inputs, geometric-median b_pre, unit-norm decoder, AuxK 1/32",  # table() fills in config's
    "sparsify": "Signum (schedule-free SignSGD, momentum 0.95) 5e-3/sqrt(n/2^14), no schedule; FVU loss, no AuxK; "
                "evaluated at the schedule-free average",
    "saelens": "Adam 3e-4, constant, grad clip 1; MSE loss, raw inputs, decoder init norm 0.1, AuxK after 1000 steps",
}


# --- trainers (each returns step(x), reconstruct(x) and the learning rate it runs at) -------------------------
def build_ours(d: int, n: int, total: int, train: dict, vectors):
    from sae_core.config import TrainConfig

    train = {"init_samples": TrainConfig.model_fields["init_samples"].default, **train}
    step, reconstruct, _ = peers.build_ours(dict(arch="topk", d=d, n=n, k=K, batch=BATCH), total, "ours", "cpu",
                                            vectors, **train)
    return step, reconstruct, step.__self__.base_lr  # step is the TrainingSession's bound method


def build_sparsify(d: int, n: int, total: int, train: dict, vectors):
    import torch
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig, TrainConfig
    from sparsify.sign_sgd import SignSGD

    cfg = TrainConfig(SparseCoderConfig(num_latents=n, k=K))
    # the step below is its trainer's with these defaults; a release that changes them must be re-read
    assert (cfg.optimizer, cfg.loss_fn, cfg.auxk_alpha, cfg.lr, cfg.grad_acc_steps) == ("signum", "fvu", 0, None, 1)
    torch.set_float32_matmul_precision("high")
    torch.manual_seed(cfg.init_seeds[0])
    sae = SparseCoder(d, cfg.sae, device="cpu", dtype=torch.float32)
    opt = ScheduleFreeWrapper(SignSGD([{"params": sae.parameters(), "lr": 5e-3 / (n / 2**14) ** 0.5}]), momentum=0.95)
    opt.train()
    step = peers.sparsify_step(sae, opt)

    def reconstruct(x):
        opt.eval()  # the averaged weights, the ones sparsify saves
        try:
            return sae(x).sae_out
        finally:
            opt.train()

    return step, reconstruct, opt.param_groups[0]["lr"]


def build_saelens(d: int, n: int, total: int, train: dict, vectors):
    from sae_lens import SAETrainer, TopKTrainingSAE
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=n, k=K))
    # the trainer asserts lr_end is set and its config has no post-init to set it; the constant schedule
    # ignores it. SAETrainerConfig.lr is the field's default
    trainer = SAETrainer(cfg=SAETrainerConfig(total_training_samples=total, train_batch_size_samples=BATCH,
                                              lr_end=SAETrainerConfig.lr), sae=sae, data_provider=iter(()))

    def step(x):
        trainer.maybe_reset_sparsity()
        trainer.step(x)
        trainer.n_training_steps += 1

    return step, lambda x: sae.decode(sae.encode(x)), trainer.optimizer.param_groups[0]["lr"]


BUILDERS = {"ours": build_ours, "sparsify": build_sparsify, "saelens": build_saelens}


# --- worker (one per subprocess) ---------------------------------------------------------------------------------
def batches(d: int):
    """seed -> peers.batch(d, BATCH, seed), 7x faster (it took longer than our step at 384x6144): the same
    draws in the same order, the features summed by embedding_bag rather than through a gathered [n, 32, d]
    tensor. Checked against peers.batch, so that a change there cannot go unnoticed."""
    import torch

    dictionary = torch.randn(peers.N_FEATURES, d, generator=torch.Generator().manual_seed(1234))
    dictionary /= dictionary.norm(dim=1, keepdim=True)

    def batch(seed: int):
        g = torch.Generator().manual_seed(seed)
        idx = torch.randint(0, peers.N_FEATURES, (BATCH, peers.ACTIVE), generator=g)
        mag = torch.empty(BATCH, peers.ACTIVE).exponential_(generator=g)
        x = torch.nn.functional.embedding_bag(idx, dictionary, per_sample_weights=mag, mode="sum")
        return x + 0.01 * torch.randn(x.shape, generator=g)

    assert torch.allclose(batch(10_000), peers.batch(d, BATCH, 10_000), atol=1e-5), "peers.batch has changed"
    return batch


def file_vectors(path: str):
    """(n, seed) -> n rows of a bench/minilm_vectors.py file, memory-mapped, numbered as peers.batch's seeds:
    seed 1 the held-out rows, seed 10_000 + i training rows i * n to (i + 1) * n (the file is shuffled)."""
    import numpy as np
    import torch

    rows = np.load(path, mmap_mode="r")

    def vectors(n: int, seed: int):
        start = 0 if seed == 1 else peers.N_EVAL + (seed - 10_000) * n
        assert n <= peers.N_EVAL if seed == 1 else start + n <= len(rows), f"{path} holds {len(rows)} rows"
        return torch.from_numpy(rows[start:start + n].astype(np.float32))

    return vectors


def worker(spec: dict) -> None:
    """Trains spec's steps, printing the record so far at every eval point (a timeout keeps the curve); stops
    at an eval point when reaching the next one would pass budget_s."""
    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    d, steps, eval_at = spec["d"], spec["steps"], spec["eval_at"]
    if spec["data"]:
        vectors = file_vectors(spec["data"])
        x_eval, batch = vectors(peers.N_EVAL, 1), lambda seed: vectors(BATCH, seed)
    else:
        vectors, x_eval, batch = None, peers.batch(d, peers.N_EVAL, 1), batches(d)
    step, reconstruct, lr = BUILDERS[spec["trainer"]](d, spec["n"], steps * BATCH, spec["ours_train"], vectors)
    out = {"lr": lr, "curve": [], "steps": 0, "train_s": 0.0}
    start = time.perf_counter()
    for i in range(steps):
        x = batch(10_000 + i)
        t0 = time.perf_counter()
        step(x)
        out["train_s"] += time.perf_counter() - t0
        out["steps"] = i + 1
        if i + 1 not in eval_at:
            continue
        with torch.no_grad():
            x_hat = reconstruct(x_eval).float()
        fvu = float((x_eval - x_hat).pow(2).sum() / (x_eval - x_eval.mean(0)).pow(2).sum())
        out["curve"].append({"vectors": (i + 1) * BATCH, "fvu": fvu, "train_s": out["train_s"]})
        print(json.dumps(out), flush=True)
        later = [s for s in eval_at if s > i + 1]
        if later and (time.perf_counter() - start) / (i + 1) * later[0] > spec["budget_s"]:
            out["partial"] = True
            break
    print(json.dumps({**out, "done": True}), flush=True)


# --- driver --------------------------------------------------------------------------------------------------------
def last_record(stdout: str) -> dict | None:
    """The worker's last record (sparsify prints plain lines too). A killed worker leaves no half line: each
    record is one write to the pipe, under the PIPE_BUF a pipe writes whole."""
    records = [line for line in stdout.splitlines() if line.startswith("{")]
    return json.loads(records[-1]) if records else None


def run_one(python: Path, spec: dict, args) -> dict:
    cmd = [str(python), __file__, "--worker", json.dumps(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    try:  # the worker stops itself within budget_s; the limit here only catches one that hangs
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1.25 * args.budget_s + 300)
        stdout = proc.stdout
        why = proc.returncode and (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
    except subprocess.TimeoutExpired as e:  # its output so far comes as bytes, whatever text= says
        stdout, why = (e.stdout or b"").decode(errors="replace"), "killed at the time limit"
    r = last_record(stdout) or {"lr": None, "curve": [], "steps": 0, "train_s": 0.0}
    vectors = f"{r['steps'] * BATCH:,} vectors"
    note = (f"failed at {vectors}: {why or 'no final record'}" if why or not r.get("done")
            else f"partial at {vectors} (--budget-s)" if r.get("partial") else "")
    trainer = spec["trainer"] + (f" {json.dumps(spec['ours_train'])}" if spec["trainer"] == "ours" and spec["ours_train"]
                                 else "")
    return {"config": spec["config"], "trainer": trainer, "budget": spec["steps"] * BATCH,
            "lr": r["lr"], "curve": r["curve"], "steps": r["steps"], "train_s": r["train_s"], "note": note}


def fvu_at(run: dict, vectors: float) -> str:
    """FVU at the last eval point at or before `vectors`; blank where the run stopped short of them."""
    points = [p for p in run["curve"] if p["vectors"] <= vectors]
    return f"{points[-1]['fvu']:.4f}" if points and run["steps"] * BATCH >= vectors else ""


def ordered(runs: list[dict]) -> list[dict]:
    """By config, then trainer (ours at its defaults before ours with settings changed)."""
    configs = list(CONFIGS)
    return sorted(runs, key=lambda r: (configs.index(r["config"]), TRAINERS.index(r["trainer"].split()[0]),
                                       r["trainer"] != r["trainer"].split()[0]))


def table(saved: dict) -> None:
    runs = ordered(saved["runs"])
    print(f"vectors: {DATA[saved.get('data', 'synthetic')]}")
    from sae_core.config import HORIZON_BETA, HORIZON_D1, HORIZON_MAX

    for t in dict.fromkeys(r["trainer"].split()[0] for r in runs):
        print(f"{t}: {DEFAULTS[t].format(max=HORIZON_MAX, d1=HORIZON_D1, beta=HORIZON_BETA)}")
    print()
    print("| config | trainer | lr | vectors | " + " | ".join(f"FVU @{f:.0%}" for f in FRACTIONS)
          + " | final FVU | s/step | note |")
    print("|" + "---|" * (7 + len(FRACTIONS)))
    for r in runs:
        final = f"{r['curve'][-1]['fvu']:.4f}" if r["curve"] else ""
        per_step = f"{r['train_s'] / r['steps']:.3f}" if r["steps"] else ""
        cells = [r["config"], r["trainer"], f"{r['lr']:.2e}" if r["lr"] else "", f"{r['steps'] * BATCH:,}",
                 *(fvu_at(r, f * r["budget"]) for f in FRACTIONS), final, per_step, r["note"]]
        print("| " + " | ".join(cells) + " |")


def figure(saved: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    from analysis.figures.style import STYLE
    from sae_core.io import write_atomic

    runs, data = ordered(saved["runs"]), saved.get("data", "synthetic")
    configs = list(dict.fromkeys(r["config"] for r in runs))
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(configs), figsize=(4.6 * len(configs), 3.6), squeeze=False)
        for ax, name in zip(axes[0], configs):
            ends = []
            for r in (r for r in runs if r["config"] == name and r["curve"]):
                v, f = [p["vectors"] for p in r["curve"]], [p["fvu"] for p in r["curve"]]
                label = r["trainer"] + (" (partial)" if r["note"] else "")
                tuned = r["trainer"] != r["trainer"].split()[0]  # ours off its defaults
                color = "C3" if tuned else f"C{TRAINERS.index(r['trainer'])}"
                ax.plot(v, f, marker="o", color=color, label=label, ls="--" if tuned else "-")
                ends.append((f[-1], v[-1], color))
            label_y = 0.0
            for f, v, color in sorted(ends):  # final values' labels at least 7% apart, so none hides another
                label_y = max(f, label_y * 1.07)
                ax.annotate(f"{f:.3f}", (v, f), xytext=(v * 1.15, label_y), va="center", fontsize=7, color=color)
            ax.set(xscale="log", yscale="log", xlabel="vectors seen", ylabel="held-out FVU",
                   title=f"{name}, k {K}, {data} vectors, defaults")
            ax.legend()
        write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
        plt.close(fig)


def data_file(data: str, d: int, vectors: int) -> str | None:
    """What the workers read: None for the synthetic vectors, else the real-activation file (built once)."""
    if data == "synthetic":
        return None
    import minilm_vectors  # bench/minilm_vectors.py

    if d != minilm_vectors.D or vectors > minilm_vectors.VECTORS:
        sys.exit(f"--data minilm: {minilm_vectors.D}-dimensional vectors, {minilm_vectors.VECTORS:,} to train on; "
                 f"asked for d {d} and {vectors:,}")
    return str(minilm_vectors.ensure(minilm_vectors.VECTORS))


def outputs(args, json_name: str, figure_name: str) -> None:
    """Default --out-json and --figure, one pair per --data (the synthetic ones keep their plain names)."""
    suffix = "" if args.data == "synthetic" else f"_{args.data}"
    args.out_json = args.out_json or peers.ROOT / f"bench/results/{json_name}{suffix}.json"
    args.figure = args.figure or peers.ROOT / f"docs/figures/{figure_name}{suffix}.png"


def budgets(args) -> dict[str, int]:
    """Training steps per config: the default budget or --vectors', times --scale, in whole batches."""
    given = dict(item.split("=") for item in args.vectors.split(",")) if args.vectors else {}
    return {name: max(1, round(int(given.get(name, CONFIGS[name][2])) * args.scale / BATCH))
            for name in args.configs.split(",")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="384x6144,768x24576")
    ap.add_argument("--trainers", default=",".join(TRAINERS))
    ap.add_argument("--vectors", help="budgets, e.g. 384x6144=2048000,768x24576=1003520 (default: those)")
    ap.add_argument("--scale", type=float, default=1.0, help="every budget times this (smoke tests: 0.005)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget-s", type=float, default=3600, help="wall seconds per (config, trainer)")
    ap.add_argument("--isa", choices=["avx2"], help="cap the instruction sets (bench/machine.py)")
    ap.add_argument("--peer-python", help="the python that runs the peers (default: bench/.venv, built on first use)")
    ap.add_argument("--data", choices=list(DATA), default="synthetic")
    ap.add_argument("--out-json", type=Path, help="default bench/results/quality_defaults[_DATA].json")
    ap.add_argument("--figure", type=Path, help="default docs/figures/peers_quality[_DATA].png")
    ap.add_argument("--add", action="store_true", help="add these runs to --out-json's (same machine) instead of "
                                                        "starting it afresh")
    ap.add_argument("--plot-only", action="store_true", help="table and figure from --out-json, no training")
    ap.add_argument("--ours-train", type=json.loads, default={},
                    help='TrainConfig keys for ours, off its defaults, e.g. \'{"lr": 0.0013}\' (the table says so)')
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    outputs(args, "quality_defaults", "peers_quality")
    import machine  # bench/machine.py: which CPU kind the numbers belong to

    machine.cap_isa(args.isa)  # re-runs this process capped (torch reads the caps on load); workers inherit them
    sys.path.insert(0, str(peers.ROOT))
    from sae_core.io import write_atomic
    from sae_core.trainer import curve_steps

    if args.plot_only:
        saved = json.loads(args.out_json.read_text())
        print(f"measured on {saved['machine']}\n")
        table(saved)
        figure(saved, args.figure)
        return
    saved = {"machine": machine.describe(), "threads": args.threads, "data": args.data, "runs": []}
    if args.add:  # the runs already there stay, but for any this invocation measures again
        saved = {**json.loads(args.out_json.read_text()), "machine": saved["machine"]}
    print(saved["machine"] + "\n", flush=True)
    trainers = args.trainers.split(",")
    peer = None if trainers == ["ours"] else Path(args.peer_python) if args.peer_python else peers.ensure_peer_venv()
    for name, steps in budgets(args).items():
        d, n, _ = CONFIGS[name]
        data = data_file(args.data, d, steps * BATCH)
        for t in trainers:
            spec = dict(config=name, trainer=t, d=d, n=n, steps=steps, eval_at=curve_steps(steps, BATCH, PER_DECADE),
                        threads=args.threads, budget_s=args.budget_s, ours_train=args.ours_train, data=data)
            run = run_one(Path(sys.executable) if t == "ours" else peer, spec, args)
            print(f"{name} {t}: {run['steps']} steps, {run['train_s']:.0f} s training {run['note']}", flush=True)
            saved["runs"] = [r for r in saved["runs"] if (r["config"], r["trainer"]) != (run["config"], run["trainer"])]
            saved["runs"].append(run)
            write_atomic(args.out_json, lambda tmp: Path(tmp).write_text(json.dumps(saved, indent=1)))
    print()
    table(saved)
    figure(saved, args.figure)


if __name__ == "__main__":
    main()
