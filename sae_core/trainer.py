"""The one trainer core. It knows nothing architecture-specific: it initialises from data, runs the
optimizer with the decoder constraint, tracks dead latents, records training curves at log-spaced
token counts, checkpoints, and evaluates on held-out vectors. Families plug in through
`Architecture.loss` (sae_core/architectures/base.py).

The same code trains one SAE on S x R processes (sae_core/parallel/mesh.py): each holds a shard of the
latents and a replica's slice of every batch. What crosses processes, and why it is then equal to the
single-process run: the b_pre gradient is summed over shards in backward (every shard's encoder reads
x - b_pre); gradients are averaged over replicas (each replica's loss is its rows' mean); the dead-latent
counters take the minimum over replicas (a latent fired if it fired in any replica's rows); the gradient
norm sums the shards' squares; the finite-loss and loss-scale decisions are agreed by all ranks.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sae_core.architectures import LossOutput, SAEConfig, StepContext, parse_sae_config
from sae_core.architectures.base import input_rms, registry
from sae_core.checkpoint import (
    TrainerState,
    UnreadableCheckpoint,
    has_checkpoint,
    load_checkpoint,
    move_aside,
    save_checkpoint,
)
from sae_core.config import TrainConfig, parse_train_config, with_family_defaults
from sae_core.errors import ConfigError, DataError
from sae_core.evaluation.reconstruction import Evaluation, evaluate
from sae_core.geometric_median import geometric_median
from sae_core.kernels import resolve_selection
from sae_core.loss_scale import INITIAL_SCALE, unscale_and_update
from sae_core.normalization import normalize
from sae_core.optim import Adam, clip_grad_norm, row_sparse_parts
from sae_core.parallel.mesh import TRIVIAL, Mesh
from sae_core.sae import SAE
from sae_core.sae_files import LATENT_STATS_FILE, save_latent_stats
from sae_core.sources.base import ActivationSource

FIT_SAMPLES = 2048  # init-sample vectors the encoder scale is fitted on: one scalar needs few


@dataclass
class RunResult:
    status: str  # ok | diverged | stopped (max_steps reached before the end; resumable)
    error: str | None
    metrics: dict[str, float]  # held-out: nmse, mse, l0, l1, dead_frac, dead_frac_eval
    curve: list[dict]
    steps: int
    tokens: int
    flops: float
    lr: float
    wall_seconds: float
    device: str
    ema_used: bool = False
    sae: SAE | None = field(default=None, repr=False)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name!r} requested but CUDA is not available; allowed here: auto, cpu")
    return torch.device(name)


def curve_steps(total_steps: int, batch_size: int, per_decade: int) -> list[int]:
    """Steps at which the curve is sampled: log-spaced in tokens from the first batch, plus the last step."""
    first, last = math.log10(batch_size), math.log10(total_steps * batch_size)
    n = int(math.floor((last - first) * per_decade)) + 1
    # the tolerance keeps 10**log10(B) / B == 1.0000000001 from rounding up to step 2
    steps = {min(total_steps, math.ceil(10 ** (first + i / per_decade) / batch_size - 1e-9)) for i in range(n)}
    return sorted(steps | {total_steps})


def lr_at(step: int, total_steps: int, base: float, cfg: TrainConfig) -> float:
    scale = 1.0
    warm = int(cfg.lr_warmup_frac * total_steps)
    if warm and step < warm:
        scale = (step + 1) / warm
    decay_start = total_steps - int(cfg.lr_decay_frac * total_steps)
    if step >= decay_start:
        scale *= (total_steps - step) / (total_steps - decay_start)
    return base * scale


def resolved_resamples(sae_cfg: SAEConfig, cfg: TrainConfig) -> int:
    return registry()[sae_cfg.arch].default_resamples if cfg.resample_dead is None else cfg.resample_dead


def resolve_configs(sae: dict | SAEConfig, train: dict | TrainConfig,
                    source: str = "config") -> tuple[SAEConfig, TrainConfig]:
    """The SAE config and the training config a Trainer trains with: both validated (errors name `source` and
    the key), the family's own training settings for the keys the user left at their defaults."""
    sae_cfg = parse_sae_config(sae, source=source)
    cfg = parse_train_config(train, source=source)
    return sae_cfg, with_family_defaults(cfg, registry()[sae_cfg.arch].train_defaults)


def train_fingerprint(sae_cfg: SAEConfig, cfg: TrainConfig) -> str:
    """What a checkpoint must have been trained with to be resumed (TrainConfig with the family defaults)."""
    ident = {"sae": sae_cfg.model_dump(), "train": cfg.model_dump(exclude={"device"})}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def continuable(sae_cfg: SAEConfig, cfg: TrainConfig) -> bool:
    """Whether a run trained to T tokens is exactly the first T tokens of the same run with a larger budget:
    nothing in its step depends on the budget (no lr warm-up or decay, whose lengths are fractions of it, and
    no dead-latent resampling, whose steps are) and the data stream is the same endless one (it is)."""
    return cfg.lr_warmup_frac == 0 and cfg.lr_decay_frac == 0 and resolved_resamples(sae_cfg, cfg) == 0


def layout_problems(sae_cfg: SAEConfig, cfg: TrainConfig, shards: int, replicas: int) -> list[str]:
    """Why S shards x R replicas cannot train this run, as "key: reason; allowed" lines (none if they can)."""
    problems = []
    if shards > 1:
        shardable = sorted(name for name, fam in registry().items() if fam.shardable)
        if not registry()[sae_cfg.arch].shardable:
            problems.append(f"shards: {sae_cfg.arch} cannot be sharded over latents; allowed with shards > 1: "
                            f"{', '.join(shardable)} (replicas work for every architecture)")
        elif sae_cfg.n_latents % shards:
            problems.append(f"shards: {shards} does not divide n_latents ({sae_cfg.n_latents}); allowed: a divisor")
        if resolved_resamples(sae_cfg, cfg):
            problems.append("train.resample_dead: resampling is not sharded; allowed with shards > 1: 0")
    if cfg.batch_size % replicas:
        problems.append(f"train.batch_size: {cfg.batch_size} is not a multiple of replicas ({replicas}); "
                        "allowed: a multiple")
    return problems


class Trainer:
    def __init__(self, sae_cfg: SAEConfig | dict, train_cfg: TrainConfig | dict, source: ActivationSource,
                 out_dir: str | Path | None = None, meta: dict | None = None, mesh: Mesh = TRIVIAL):
        """meta: saved with the SAE (e.g. the hook it reads: {"hook": {"model", "site", "layers"}}).
        mesh: this process's shard and replica when the run is trained by several (build_mesh)."""
        self.meta = dict(meta or {})
        self.sae_cfg, self.cfg = resolve_configs(sae_cfg, train_cfg)
        problems = layout_problems(self.sae_cfg, self.cfg, mesh.shards, mesh.replicas)
        if problems:
            raise ConfigError("\n".join(problems))
        self.mesh = dataclasses.replace(mesh, capacity=self.cfg.shard_capacity)
        resamples = resolved_resamples(self.sae_cfg, self.cfg)
        total = self.cfg.steps()
        self.resample_steps = {round(total * i / (resamples + 1)) for i in range(1, resamples + 1)} - {0}
        if source.d_in != self.sae_cfg.d_in:
            raise ConfigError(f"sae.d_in: {self.sae_cfg.d_in} does not match the activations' dimension "
                              f"{source.d_in}; allowed: {source.d_in}")
        self.source = source
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.device = resolve_device(self.cfg.device)
        self.selection = resolve_selection(self.cfg.topk_select, self.cfg.topk_select_capacity, self.device,
                                           self.cfg.batch_size // mesh.replicas)
        self.fingerprint = train_fingerprint(self.sae_cfg, self.cfg)

    # --- setup -----------------------------------------------------------------------------
    def _init_from_data(self, sae: SAE) -> tuple[float, float]:
        """Initialise the SAE from the init sample; return mse_scale and input_rms (StepContext)."""
        cfg = self.cfg
        raw = self.source.sample(cfg.init_samples)
        refuse_nonfinite(raw, f"the init sample (the first {cfg.init_samples} training vectors)")
        sample, _ = normalize(raw.to(torch.float64), self.sae_cfg.normalization)
        sae.net.reset_parameters(cfg.tied_init, cfg.seed)
        with torch.no_grad():
            if cfg.b_pre_init == "geometric_median":
                sae.net.b_pre.copy_(geometric_median(sample))
            elif cfg.b_pre_init == "mean":
                sae.net.b_pre.copy_(sample.mean(dim=0))
            self._scale_encoder(sae, sample[:FIT_SAMPLES].to(sae.net.W_dec.dtype))
        variance = float((sample - sample.mean(dim=0)).pow(2).sum(dim=1).mean())
        return 1.0 / variance if variance > 0 else 1.0, input_rms(sample, self.sae_cfg.normalization)

    def _scale_encoder(self, sae: SAE, x: torch.Tensor) -> None:
        """A random tied encoder's latents are too large by a factor that depends on d, n and k (the initial
        nmse of a tied ReLU SAE is ~10). Activations homogeneous at init (TopK family, ReLU, Gated: biases
        are 0) make the reconstruction's offset from b_pre scale with W_enc, so the least-squares factor
        s = <x - b_pre, r> / ||r||^2, r = x_hat - b_pre, is exact for them; others keep it only if it helps.
        bench/peers.py shows the effect on nmse at equal vectors."""
        arch, scale = sae.net, self.cfg.init_encoder_scale
        if scale == "fit":
            target = x - arch.b_pre

            def offset() -> torch.Tensor:
                return arch.decode(arch.encode(x)) - arch.b_pre

            r = offset()
            before, scale = float((target - r).pow(2).sum()), float((target * r).sum() / (r * r).sum().clamp_min(1e-30))
            if not (math.isfinite(scale) and scale > 0):
                return
            arch.W_enc.mul_(scale)
            if float((target - offset()).pow(2).sum()) > before:
                arch.W_enc.div_(scale)
            return
        arch.W_enc.mul_(scale)

    def _optimizer(self, sae: SAE, lr: float) -> torch.optim.Optimizer:
        cfg = self.cfg
        return Adam(sae.net.parameters(), lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)

    def _autocast(self):
        if self.cfg.autocast == "none":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.cfg.autocast == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    # --- evaluation helpers ------------------------------------------------------------------
    @torch.no_grad()
    def _load_ema(self, sae: SAE, ema: dict[str, torch.Tensor], step: int) -> None:
        """Copy the bias-corrected EMA weights (Kingma and Ba's correction, as in Gao et al. 2024, §A.5) into
        the SAE."""
        correction = 1.0 - self.cfg.ema_decay ** max(step, 1)
        for k, p in sae.net.named_parameters():
            p.copy_(ema[k] / correction)

    @contextlib.contextmanager
    def _ema_weights(self, sae: SAE, ema: dict[str, torch.Tensor], step: int):
        """Temporarily load the bias-corrected EMA weights."""
        params = dict(sae.net.named_parameters())
        saved = {k: p.detach().clone() for k, p in params.items()}
        self._load_ema(sae, ema, step)
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(saved[k])

    def _evaluate(self, sae: SAE, x: torch.Tensor, ema, step,
                  layer_ids: torch.Tensor | None = None) -> tuple[Evaluation, bool]:
        """Held-out evaluation of the raw weights, or of the EMA weights where they are better (Gao et al. 2024,
        §A.5: the min of the two validation losses).
        layer_ids (multi-layer SAEs): nmse is the mean over layers of each layer's FVU (evaluate())."""
        raw = evaluate(sae, x, self.cfg.eval_batch_size, layer_ids=layer_ids)
        if not ema:  # empty when EMA is off
            return raw, False
        with self._ema_weights(sae, ema, step):
            averaged = evaluate(sae, x, self.cfg.eval_batch_size, layer_ids=layer_ids)
        if averaged.metrics["nmse"] < raw.metrics["nmse"]:
            averaged.metrics["nmse_raw"] = raw.metrics["nmse"]
            return averaged, True
        raw.metrics["nmse_ema"] = averaged.metrics["nmse"]
        return raw, False

    # --- the loop ----------------------------------------------------------------------------
    def start(self) -> TrainingSession:
        """Build the SAE and optimizer, from out_dir's checkpoint if there is one, else from data."""
        cfg, device = self.cfg, self.device
        torch.manual_seed(cfg.seed)
        sae = SAE(self.sae_cfg, init_seed=None, mesh=self.mesh).to(device)
        base_lr = cfg.resolved_lr(self.sae_cfg.n_latents)
        opt = self._optimizer(sae, base_lr)
        if self.out_dir is not None and has_checkpoint(self.out_dir):
            resumed = self._resume(sae, opt)
            if resumed is None:
                return self.start()  # afresh: the failed load may have set some weights and the RNG
            st, tsf, ema = resumed
        else:
            mse_scale, rms = self._init_from_data(sae)
            st = TrainerState(mse_scale=mse_scale, input_rms=rms, fingerprint=self.fingerprint,
                              loss_scale=INITIAL_SCALE if cfg.autocast == "fp16" else 1.0)
            tsf = torch.zeros(sae.net.n_local, dtype=torch.int64, device=device)
            ema = {k: torch.zeros_like(p) for k, p in sae.net.named_parameters()} if cfg.ema_decay else {}
        return TrainingSession(self, sae, opt, st, tsf, ema, base_lr)

    def _resume(self, sae: SAE, opt: torch.optim.Optimizer):
        """The checkpoint's state, or None if some rank cannot read it back: then it is moved aside, since a
        damaged file would fail the run on every retry, and the run starts from scratch (one warning line)."""
        resumed, err = None, None
        try:
            resumed = load_checkpoint(self.out_dir, sae.net, opt, self.device, self.fingerprint)
        except UnreadableCheckpoint as unreadable:
            err = unreadable
        if self.mesh.all_true(err is None):  # a collective: past it, every rank has finished reading
            return resumed
        if self.mesh.leader:
            moved = ", ".join(p.name for p in move_aside(self.out_dir))
            why = (f"{err.path}: unreadable trainer checkpoint ({err.reason})" if err
                   else "another rank's trainer checkpoint shard is unreadable")
            print(f"warning: {why}; moved aside as {moved}; the run starts from scratch", file=sys.stderr)
        self.mesh.barrier()
        return None

    def run(self, max_steps: int | None = None,
            curve_metrics: Callable[[SAE, dict], dict[str, float]] | None = None,
            on_curve: Callable[[dict], None] | None = None) -> RunResult:
        """Train (resuming from out_dir's checkpoint if there is one) and evaluate.

        max_steps stops early with status 'stopped' after writing a checkpoint (time-boxed jobs, tests).
        curve_metrics(sae, row) adds columns to every curve row (e.g. feature recovery on synthetic data).
        on_curve(row) sees each curve row as it is recorded (trackers: sae_core/tracking.py).
        """
        steps = self.run_steps(max_steps, curve_metrics, on_curve)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def run_steps(self, max_steps: int | None = None,
                  curve_metrics: Callable[[SAE, dict], dict[str, float]] | None = None,
                  on_curve: Callable[[dict], None] | None = None,
                  until_tokens: int | None = None) -> Generator[int, None, RunResult]:
        """`run` one step at a time: yields the token count after each step and returns the RunResult, so
        one worker can train a pack of SAEs in lockstep from one activation stream. until_tokens: stop (status
        'stopped', checkpoint written) once this many tokens are trained, counted from the start, not from a
        resume; the lr schedule stays the full budget's, so the run is a prefix of the full run."""
        cfg = self.cfg
        t_start = time.time()
        session = self.start()
        sae, st, B = session.sae, session.state, cfg.batch_size
        total = cfg.steps()
        eval_x = self.source.eval_set()
        refuse_nonfinite(eval_x, "the held-out eval set")
        eval_ids = self.source.eval_layer_ids()  # multi-layer SAEs: each vector's layer
        curve_x, curve_ids = curve_subset(eval_x, eval_ids, cfg.curve_eval_tokens)
        sample_at = set(curve_steps(total, B, cfg.curve_points_per_decade))
        every = max(1, math.ceil((cfg.checkpoint_every_tokens or math.ceil(cfg.train_tokens / 10)) / B))
        stop_at = total if max_steps is None else min(total, st.step + max_steps)
        if until_tokens is not None:
            stop_at = min(stop_at, max(st.step, math.ceil(until_tokens / B)))
        status, error = "ok", None

        while st.step < stop_at:
            out = session.step(self.source.train_batch(st.step, B))
            if out is None:
                status = "diverged"
                error = f"loss became non-finite at step {st.step} (tokens {st.tokens}); last good checkpoint kept"
                break
            if st.step in sample_at:
                m = self._evaluate(sae, curve_x, session.ema, st.step, curve_ids)[0].metrics
                # loss terms first: a family's term can never shadow a held-out column of the same name
                row = {**self._replica_mean(out.terms),
                       "step": st.step, "tokens": st.tokens, "flops": st.flops, "nmse": m["nmse"], "l0": m["l0"],
                       "dead_frac": session.dead_frac(), "lr": session.lr}
                st.curve.append({**row, **(curve_metrics(sae, row) if curve_metrics else {})})
                if on_curve is not None:
                    on_curve(st.curve[-1])
            if st.step % every == 0 or st.step == stop_at:
                session.checkpoint()
            yield st.tokens

        if status == "ok" and st.step < total:
            status = "stopped"
        session.finalize()  # the family's post-training estimates (BatchTopK's threshold) for these weights
        final, ema_used = self._evaluate(sae, eval_x, session.ema, st.step, eval_ids)
        if ema_used:  # keep the better weights as the run's SAE
            self._load_ema(sae, session.ema, st.step)
            if session.finalize():  # re-estimated for the EMA weights: report (and save stats of) the SAE kept
                again = self._evaluate(sae, eval_x, {}, st.step, eval_ids)[0]
                again.metrics["nmse_raw"] = final.metrics["nmse_raw"]
                final = again
        metrics = {**final.metrics, "dead_frac": session.dead_frac()}
        whole = self._consolidated(sae)  # None on every rank but the leader
        result = RunResult(status=status, error=error, metrics=metrics, curve=list(st.curve), steps=st.step,
                           tokens=st.tokens, flops=st.flops, lr=session.base_lr, wall_seconds=time.time() - t_start,
                           device=str(self.device), ema_used=ema_used, sae=whole)
        if self.out_dir is not None and status == "ok" and whole is not None:
            whole.meta.update(self.meta, train=cfg.model_dump(), metrics=metrics, ema_used=ema_used)
            whole.save(self.out_dir)
            save_latent_stats(final, self.out_dir / LATENT_STATS_FILE)
        self.mesh.barrier()  # the SAE is on disk before any rank reports the run finished
        return result

    def _replica_mean(self, terms: dict[str, torch.Tensor]) -> dict[str, float]:
        """The loss terms of the global batch: each replica's are of its rows, scaled so their mean is it."""
        if not terms:
            return {}
        values = torch.stack([v.detach().float().reshape(()) for v in terms.values()]).cpu()
        return dict(zip(terms, self.mesh.reduce_(values, "replicas", "mean").tolist()))

    def _consolidated(self, sae: SAE) -> SAE | None:
        """The whole SAE on the leader (the shards' rows gathered), None elsewhere; the SAE itself in one process."""
        mesh = self.mesh
        if mesh.shards == 1:
            return sae if mesh.leader else None
        latent = set(sae.net.latent_parameters())
        state = {k: mesh.gather_to_leader(v) if k in latent else v for k, v in sae.net.state_dict().items()}
        if not mesh.leader:
            return None
        whole = SAE(self.sae_cfg, init_seed=None).to(self.device)
        whole.net.load_state_dict(state)
        return whole


@dataclass
class TrainingSession:
    """A run in progress: the SAE, its optimizer and the state a checkpoint must hold."""

    trainer: Trainer
    sae: SAE
    opt: torch.optim.Optimizer
    state: TrainerState
    tokens_since_fired: torch.Tensor
    ema: dict[str, torch.Tensor]
    base_lr: float
    lr: float = 0.0

    def __post_init__(self):
        cfg = self.trainer.cfg
        self.scaled = cfg.autocast == "fp16"
        self.constrain = cfg.decoder_unit_norm and self.sae.net.constrain_decoder

    @torch.no_grad()
    def resample_dead(self, x: torch.Tensor) -> int:
        """Bricken et al. (2023): each dead latent gets the direction of an input drawn with probability
        proportional to its squared reconstruction loss; its encoder row the same direction at 0.2 x the
        mean alive encoder norm; its Adam moments are zeroed and its dead counter restarts. x is normalised."""
        arch, cfg = self.sae.net, self.trainer.cfg
        dead = self.dead_mask().nonzero().squeeze(1)
        if not dead.numel():
            return 0
        loss = (x - arch.decode(arch.encode(x))).pow(2).sum(dim=1)
        gen = torch.Generator(device=x.device).manual_seed(cfg.seed * 1_000_003 + self.state.step)
        weights = loss.pow(2) if float(loss.max()) > 0 else torch.ones_like(loss)
        picks = torch.multinomial(weights, dead.numel(), replacement=True, generator=gen)
        directions = torch.nn.functional.normalize(x[picks] - arch.b_pre, dim=1)
        alive = torch.ones(arch.n_local, dtype=torch.bool, device=x.device)
        alive[dead] = False
        norms = arch.W_enc.norm(dim=1)
        encoder_norm = 0.2 * float(norms[alive].mean() if alive.any() else norms.mean())
        arch.reinit_latents(dead, directions, encoder_norm)
        params = dict(arch.named_parameters())
        for name in arch.latent_parameters():
            for moment in ("exp_avg", "exp_avg_sq"):
                if moment in self.opt.state.get(params[name], {}):
                    self.opt.state[params[name]][moment][dead] = 0.0
        self.tokens_since_fired[dead] = 0
        return int(dead.numel())

    def training_batches(self) -> Iterator[torch.Tensor]:
        """This replica's normalised rows of the run's training batches, the last first (re-read: a source is a
        pure function of the step), one at a time as the consumer asks."""
        tr, mesh, B = self.trainer, self.trainer.mesh, self.trainer.cfg.batch_size
        for step in range(self.state.step - 1, -1, -1):
            batch = tr.source.train_batch(step, B)[mesh.batch_rows(B)].to(tr.device, non_blocking=True)
            yield normalize(batch, tr.sae_cfg.normalization)[0]

    @torch.no_grad()
    def finalize(self) -> bool:
        """Architecture.finalize with the current weights (every rank alike); whether it changed anything."""
        return bool(self.sae.net.finalize(self.training_batches()))

    def dead_mask(self) -> torch.Tensor:
        """Latents unfired for dead_window_tokens tokens. Gao et al. (2024), B.2: "We consider a feature dead
        if it does not activate for 10 million tokens". The counter is in vectors, and a multi-layer SAE sees
        one vector per layer of each token, so its window is dead_window_tokens x the number of layers."""
        window = self.trainer.cfg.dead_window_tokens * self.trainer.source.vectors_per_token
        return self.tokens_since_fired >= window

    def dead_count(self) -> int:
        """Dead latents over all shards."""
        here = self.dead_mask().sum().reshape(1)
        return int(self.trainer.mesh.reduce_(here, "shards"))

    def dead_frac(self) -> float:
        return self.dead_count() / self.trainer.sae_cfg.n_latents

    def checkpoint(self) -> None:
        tr = self.trainer
        if tr.out_dir is not None:
            save_checkpoint(tr.out_dir, self.state, self.sae.net, self.opt, self.tokens_since_fired, self.ema,
                            tr.sae_cfg.model_dump(), tr.mesh)

    def step(self, batch: torch.Tensor) -> LossOutput | None:
        """One optimizer step on a raw global batch (this replica trains on its rows of it); None (and no
        update) if the loss is not finite on some replica; DataError if that is because the batch is."""
        tr, cfg, st, arch, mesh = self.trainer, self.trainer.cfg, self.state, self.sae.net, self.trainer.mesh
        x, _ = normalize(batch[mesh.batch_rows(batch.shape[0])].to(tr.device, non_blocking=True),
                         tr.sae_cfg.normalization)
        dead = self.dead_mask().nonzero().squeeze(1)
        ctx = StepContext(mse_scale=st.mse_scale, input_rms=st.input_rms,
                          dead_latents=dead if dead.numel() else None,
                          dead_total=self.dead_count(), progress=st.step / cfg.steps(), selection=tr.selection,
                          mesh=mesh)
        with tr._autocast():
            out = arch.loss(x, ctx)
        if not mesh.all_true(math.isfinite(float(out.loss.detach()))):
            # nan or inf in a batch always makes the loss so; looked for only then, which costs nothing
            # when training is healthy. The whole batch, so that every replica decides alike
            refuse_nonfinite(batch, f"the training batch of step {st.step} (tokens {st.tokens})")
            return None
        self.opt.zero_grad(set_to_none=True)
        (out.loss * st.loss_scale if self.scaled else out.loss).backward()
        self._average_replicas()
        if not self.scaled or unscale_and_update(arch.parameters(), st, mesh):  # else skipped, as GradScaler does
            self._update()
        if self.ema:
            with torch.no_grad():
                for k, p in arch.named_parameters():
                    self.ema[k].lerp_(p.detach(), 1.0 - cfg.ema_decay)
        self.tokens_since_fired += batch.shape[0]
        self.tokens_since_fired[arch.active_latents(out.code)] = 0
        mesh.reduce_(self.tokens_since_fired, "replicas", "min")
        for buffer in arch.buffers():  # running statistics (BatchTopK's threshold): the replicas' mean
            mesh.reduce_(buffer, "replicas", "mean")
        if st.step in tr.resample_steps:  # from the whole batch, so every replica resamples alike
            self.resample_dead(normalize(batch.to(tr.device), tr.sae_cfg.normalization)[0])
        st.step += 1
        st.tokens += batch.shape[0]
        st.flops += out.flops * mesh.replicas
        return out

    def _average_replicas(self) -> None:
        mesh = self.trainer.mesh
        if mesh.replicas == 1:
            return
        for p in self.sae.net.parameters():  # row-sparse gradients densified: replicas' rows differ
            g = torch.zeros_like(p) if p.grad is None else p.grad.to_dense()
            p.grad = mesh.reduce_(g, "replicas", "mean")

    def _update(self) -> None:
        tr, cfg, arch = self.trainer, self.trainer.cfg, self.sae.net
        if self.constrain:
            _remove_parallel_grad(arch.W_dec)
        if cfg.grad_clip is not None:
            clip_grad_norm([p for k, p in arch.named_parameters() if k != "b_pre"], cfg.grad_clip,
                           shared=[arch.b_pre], mesh=tr.mesh)
        self.lr = lr_at(self.state.step, cfg.steps(), self.base_lr, cfg)
        for group in self.opt.param_groups:
            group["lr"] = self.lr
        self.opt.step()
        if self.constrain:
            _renormalize_rows(arch.W_dec)


def refuse_nonfinite(x: torch.Tensor, what: str) -> None:
    """DataError naming the first row of x [rows, d] holding nan or inf: bad input, which a rerun would meet
    again, so never recorded as a diverged run."""
    bad = ~torch.isfinite(x).all(dim=1)
    if bool(bad.any()):
        raise DataError(f"{what}: row {int(bad.nonzero()[0])} holds nan or inf; activations must be finite (from a "
                        "model run in float16, which overflows: use data.model_dtype: float32)")


def curve_subset(x: torch.Tensor, layer_ids: torch.Tensor | None,
                 n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The held-out vectors of the curve points: the first n; for a multi-layer SAE (layer_ids given; its
    set is layer-major) n split equally over the layers (the first ones of each, the same tokens in every
    layer), so a curve point's nmse is the mean over layers like the final one's, not the first layer's."""
    if layer_ids is None:
        return x[:n], None
    layers = torch.unique(layer_ids)
    per, extra = divmod(n, len(layers))
    rows = torch.cat([(layer_ids == layer).nonzero().squeeze(1)[:per + (i < extra)]
                      for i, layer in enumerate(layers.tolist())])
    return x[rows], layer_ids[rows]


PROJECTION_BLOCK = 2**20


@torch.no_grad()
def _remove_parallel_grad(W: torch.nn.Parameter) -> None:
    """g_i <- g_i - (g_i . w_i) w_i for each unit-norm decoder row w_i: the step cannot change its norm
    to first order, so the renormalisation after it loses no progress. Row-sparse gradients keep their rows."""
    if W.grad is None:
        return
    rows, g = row_sparse_parts(W.grad)
    w = W if rows is None or rows.numel() == W.shape[0] else W[rows]
    # On a CPU in blocks of PROJECTION_BLOCK entries: vecdot's product temporary and the update then stay in
    # cache (8 against 23 ms for the dot products alone at 24576 x 768 here); on a GPU in one launch.
    block = g.shape[0] if g.is_cuda else max(1, PROJECTION_BLOCK // g.shape[1])
    for start in range(0, g.shape[0], block):
        gb, wb = g[start:start + block], w[start:start + block]
        gb.addcmul_(wb, torch.linalg.vecdot(gb, wb)[:, None], value=-1)  # in place: the gradient is ours
    if rows is not None:
        W.grad = torch.sparse_coo_tensor(rows[None], g, W.shape, is_coalesced=True, check_invariants=False)


@torch.no_grad()
def _renormalize_rows(W: torch.nn.Parameter) -> None:
    W.div_(W.norm(dim=1, keepdim=True).clamp_min(1e-12))
