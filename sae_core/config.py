"""Trainer settings: every switch of the Gao et al. (2024) recipe.

The defaults (`recipe: default`) are this toolkit's, chosen for small and medium sweeps on one machine;
they differ from the paper's in a few places (docs/training.md, "The training recipe", has the table with each
paper value's section and why we differ). `recipe: gao2024` sets the paper's value of every such key the
user leaves unset (RECIPES below); a key set explicitly always wins, and so does a family's own training
setting (Architecture.train_defaults, e.g. JumpReLU's Adam beta1 = 0).
"""
from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sae_core.errors import validate

Finite = dict(allow_inf_nan=False)


# The paper's values of the keys whose defaults differ from them (Gao et al. 2024; the reference code is
# openai/sparse_autoencoder's train.py). Applied to the keys the user did not set.
RECIPES: dict[str, dict] = {
    "default": {},
    "gao2024": {
        "batch_size": 131072,  # §A.4 (batch size) and §B.2: 131072 tokens per batch; reference code Config.bs
        "ema_decay": 0.999,  # §A.5: weight EMA with Kingma-Ba bias correction; reference code: 0.999
        "init_encoder_scale": 1.0,  # §C.2: tied init; their encoder rescaling "has no effect" with it
        "topk_select": "exact",  # the reference code ranks exact pre-activations (torch.topk)
        # the paper clips gradients (Lawson et al. 2024, App. A: "Unlike Gao et al. (2024), we do not use
        # gradient clipping or weight averaging") without a value in the text we have; the reference
        # code's default is no clipping, kept here
        "grad_clip": None,
        "lr": "auto",  # Fig. 3's rule as it is; the TopK family's own default is `horizon` (below)
    },
}


def _positive_or(*keywords: str):
    """Validator of a setting that is a finite number > 0 or one of the keywords."""
    def check(v):
        if v not in keywords and not (math.isfinite(v) and v > 0):
            raise ValueError(f"must be a finite number > 0 or {' or '.join(map(repr, keywords))}")
        return v
    return check


# `lr: horizon`. The paper's rule is the best lr of runs trained to convergence (Gao et al. 2024, Fig. 3:
# 0.6-7.9B tokens); a shorter run is better served by a larger one, and Bjorck et al. 2024 ("Scaling Optimal
# LR Across Token Horizons") find the best lr falling with the horizon D as a power law. Measured for a TopK
# SAE (bench/lr_horizon.py --data minilm: 384 x 6144, k 32, batch 4096, MiniLM-L6 activations, multiples
# 1-64 of the rule, budgets 4k-8.2M vectors): from 100 steps on the interpolated best lr is the rule x
# (D / HORIZON_D1)^-HORIZON_BETA, meeting the rule at HORIZON_D1 vectors; below, it levels off, so never
# more than HORIZON_MAX times the rule (the best multiple of the grid from 2 to 178 steps). At 384 x 1536 the
# same fit gives (D / 1.1e8)^-0.41, and these constants pick a multiple within 4% of the grid's best FVU.
HORIZON_BETA, HORIZON_D1, HORIZON_MAX = 0.50, 1.2e8, 16.0


def horizon_lr_factor(train_tokens: int) -> float:
    """How many times the paper's lr rule a run of train_tokens vectors trains best at: 1 from HORIZON_D1 on."""
    return min(HORIZON_MAX, max(1.0, (train_tokens / HORIZON_D1) ** -HORIZON_BETA))


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # default: the defaults below; gao2024: the paper's values (RECIPES) for the keys left unset
    recipe: Literal[tuple(RECIPES)] = "default"  # type: ignore[valid-type]
    train_tokens: int = Field(ge=1)  # activation vectors seen (one per token and layer)
    batch_size: int = Field(4096, ge=1)  # Gao et al.: 131072 (recipe gao2024)
    # auto = 2e-4 / sqrt(n_latents / 2^14), the paper's rule; horizon = that times horizon_lr_factor(train_tokens),
    # the TopK family's default (Architecture.train_defaults), where it was measured
    lr: float | Literal["auto", "horizon"] = "auto"
    adam_beta1: float = Field(0.9, ge=0, lt=1)  # Adam's first-moment decay
    adam_beta2: float = Field(0.999, ge=0, lt=1)  # Adam's second-moment decay
    adam_eps: float = Field(6.25e-10, gt=0, **Finite)  # Adam's epsilon
    lr_warmup_frac: float = Field(0.0, ge=0, le=1)  # linear warm-up over this fraction of steps
    lr_decay_frac: float = Field(0.0, ge=0, le=1)  # linear decay to 0 over the last fraction
    b_pre_init: Literal["geometric_median", "mean", "zeros"] = "geometric_median"  # b_pre from the init sample
    init_samples: int = Field(32768, ge=1)  # vectors for b_pre and the MSE normalisation constant
    tied_init: bool = True  # W_enc = W_dec^T at init
    # fit: W_enc scaled by the least-squares factor of the initial reconstruction on the init sample (kept
    # only if it lowers that error); a number: that factor (1.0 = the paper's plain tied init, recipe gao2024)
    init_encoder_scale: float | Literal["fit"] = "fit"
    decoder_unit_norm: bool = True  # unit-norm decoder rows + parallel-gradient removal every step
    dead_window_tokens: int = Field(10_000_000, ge=1)  # a latent is dead after this many tokens unfired
    ema_decay: float | None = Field(None, gt=0, lt=1)  # None: no weight EMA; Gao et al.: 0.999 (recipe gao2024)
    grad_clip: float | None = Field(None, gt=0, **Finite)  # max gradient norm; None: no clipping
    autocast: Literal["none", "bf16", "fp16"] = "none"  # mixed precision of the forward (fp16 with loss scaling)
    # TopK family: rank the encoder's pre-activations in bf16 and recompute the winners' values exactly
    # (sae_core/kernels/topk_select.py); auto = bf16 where the hardware has native bf16 matmul (on a CPU,
    # from 2048 batch rows per process: below, the per-step bf16 copy of W_enc costs what it saves)
    topk_select: Literal["auto", "exact", "bf16"] = "auto"
    topk_select_capacity: float = Field(2.0, ge=1, le=64, **Finite)  # bf16 candidates kept per winner
    # sharded TopK: candidates each of S shards offers, as a multiple of k / S (Gao et al. D.1: 2); exact
    # whenever S <= shard_capacity
    shard_capacity: float = Field(2.0, ge=1, **Finite)
    device: str = "auto"  # auto: cuda if available, else cpu
    seed: int = 0
    curve_points_per_decade: int = Field(5, ge=1)  # training-curve points per decade of tokens
    curve_eval_tokens: int = Field(4096, ge=1)  # held-out vectors evaluated at each curve point
    eval_batch_size: int = Field(4096, ge=1)  # held-out vectors per evaluation batch
    checkpoint_every_tokens: int | None = Field(None, ge=1)  # None: 10 checkpoints per run
    resample_dead: int | None = Field(None, ge=0)  # times to resample dead latents; None: the family's default

    @model_validator(mode="wrap")
    @classmethod
    def _apply_recipe(cls, data, handler):
        """The recipe's values for the keys not given; they stay out of model_fields_set, so a family's own
        training settings (with_family_defaults) still apply, and the resolved config names every value."""
        recipe = data.get("recipe", "default") if isinstance(data, dict) else None
        preset = RECIPES.get(recipe) if isinstance(recipe, str) else None
        if not preset:  # no recipe, the default one, or an unknown name (the field's check reports it)
            return handler(data)
        given = set(data)
        model = handler({**preset, **data})
        object.__setattr__(model, "__pydantic_fields_set__", model.model_fields_set & given)
        return model

    _lr_positive_finite = field_validator("lr")(_positive_or("auto", "horizon"))
    _scale_positive_finite = field_validator("init_encoder_scale")(_positive_or("fit"))

    @field_validator("lr_decay_frac")
    @classmethod
    def _schedule_fits(cls, v, info):
        if v + info.data.get("lr_warmup_frac", 0.0) > 1:
            raise ValueError("lr_warmup_frac + lr_decay_frac must be <= 1")
        return v

    @field_validator("device")
    @classmethod
    def _device_known(cls, v):
        if v != "auto" and not (v == "cpu" or v == "cuda" or v.startswith("cuda:")):
            raise ValueError("allowed: auto, cpu, cuda, cuda:N")
        return v

    def resolved_lr(self, n_latents: int) -> float:
        if self.lr in ("auto", "horizon"):
            paper = 2e-4 / math.sqrt(n_latents / 2**14)
            return paper * horizon_lr_factor(self.train_tokens) if self.lr == "horizon" else paper
        return float(self.lr)

    def steps(self) -> int:
        return math.ceil(self.train_tokens / self.batch_size)


def with_family_defaults(cfg: TrainConfig, family_defaults: dict) -> TrainConfig:
    """The family's own training settings (e.g. JumpReLU's Adam beta1 = 0) for the keys neither the user nor
    the chosen recipe set."""
    chosen = cfg.model_fields_set | set(RECIPES[cfg.recipe])
    return cfg.model_copy(update={k: v for k, v in family_defaults.items() if k not in chosen})


def parse_train_config(data: dict | TrainConfig, source: str = "config", prefix: str = "train") -> TrainConfig:
    return validate(TrainConfig, data, source, prefix)
