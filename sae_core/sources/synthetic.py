"""Synthetic activations over a known ground-truth dictionary, for tests, the demo and benchmarks."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from sae_core.sources.base import ActivationSource, check_arg, is_int

_FREQUENCIES = ("uniform", "power_law")
_MAGNITUDES = ("exponential", "uniform", "constant", "lognormal")
_LOGNORMAL_SIGMA = 0.5
_P_MAX = 1.0 - 1e-7  # keeps the Poisson rate -log(1 - p) finite for features that (almost) always fire
_DICTIONARY, _TRAIN, _EVAL = 0, 1, 2  # separate seed streams: eval can never coincide with a training step


def _generator(seed: int, stream: int, step: int = 0) -> torch.Generator:
    state = np.random.SeedSequence([seed, stream, step]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _drop_repeats(idx: torch.Tensor, live: torch.Tensor, n_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row's live indices and mark every repeat of a feature dead."""
    idx = torch.where(live, idx, n_features).sort(dim=1).values
    live = idx < n_features
    live[:, 1:] &= idx[:, 1:] != idx[:, :-1]
    return idx.clamp_(max=n_features - 1), live


class SyntheticSource(ActivationSource):
    """x = sum_i a_i f_i + noise over `features`, a random dictionary of unit vectors f_i.

    Feature i fires independently with a base probability p_i (equal, or proportional to
    (i+1)^-frequency_exponent for power_law, capped at 1), so the number of active features varies
    from vector to vector: it is sampled as a Poisson number of draws with replacement, repeats dropped,
    which by Poisson thinning gives exactly those independent firings. With correlated_group_size g > 1,
    features [k*g, (k+1)*g) form a group and a fired feature also switches on each other member with
    probability group_coactivation. The p_i are scaled so that the expected number of active features,
    co-activations included, is active_per_vector; `active_probs` holds each feature's resulting
    marginal probability of being active. Magnitudes are positive with mean 1: Exp(1), U(0, 2], 1, or
    lognormal with sigma 0.5.
    """

    def __init__(
        self,
        *,
        d_in: int = 64,
        n_features: int = 512,
        active_per_vector: float = 8.0,
        frequency: str = "uniform",
        frequency_exponent: float = 1.0,
        magnitude: str = "exponential",
        correlated_group_size: int = 1,
        group_coactivation: float = 0.5,
        noise_std: float = 0.0,
        seed: int = 0,
        n_eval: int = 8192,
    ):
        check_arg(is_int(d_in) and d_in >= 1, "d_in", "an integer >= 1", d_in)
        check_arg(is_int(n_features) and n_features >= 1, "n_features", "an integer >= 1", n_features)
        check_arg(0 < active_per_vector <= n_features, "active_per_vector", f"in (0, n_features={n_features}]",
                  active_per_vector)
        check_arg(frequency in _FREQUENCIES, "frequency", f"one of {', '.join(_FREQUENCIES)}", frequency)
        check_arg(0 <= frequency_exponent < float("inf"), "frequency_exponent", "a finite number >= 0",
                  frequency_exponent)
        check_arg(magnitude in _MAGNITUDES, "magnitude", f"one of {', '.join(_MAGNITUDES)}", magnitude)
        check_arg(is_int(correlated_group_size) and 1 <= correlated_group_size <= n_features,
                  "correlated_group_size", f"an integer in [1, n_features={n_features}]", correlated_group_size)
        check_arg(0 <= group_coactivation <= 1, "group_coactivation", "in [0, 1]", group_coactivation)
        check_arg(0 <= noise_std < float("inf"), "noise_std", "a finite number >= 0", noise_std)
        check_arg(is_int(seed) and seed >= 0, "seed", "an integer >= 0", seed)
        check_arg(is_int(n_eval) and n_eval >= 1, "n_eval", "an integer >= 1", n_eval)

        self.d_in, self.n_features = int(d_in), int(n_features)
        self.active_per_vector = float(active_per_vector)
        self.magnitude = magnitude
        self.correlated_group_size = int(correlated_group_size)
        self.group_coactivation = float(group_coactivation)
        self.noise_std = float(noise_std)
        self.seed, self.n_eval = int(seed), int(n_eval)

        gen = _generator(self.seed, _DICTIONARY)
        self.features = F.normalize(torch.randn(self.n_features, self.d_in, generator=gen), dim=1)

        exponent = frequency_exponent if frequency == "power_law" else 0.0
        base = self._base_probs(np.arange(1, self.n_features + 1, dtype=np.float64) ** -float(exponent))
        rates = -np.log1p(-base)
        self._draw_rate = float(rates.sum())
        self._cdf = torch.from_numpy(np.cumsum(rates / self._draw_rate))
        self.active_probs = torch.from_numpy(self._marginal(base))
        self._eval: torch.Tensor | None = None

    def _marginal(self, base: np.ndarray) -> np.ndarray:
        """P(feature i active) = 1 - (1 - p_i) * prod over other group members j of (1 - q p_j)."""
        g = self.correlated_group_size
        padded = np.zeros(-(-len(base) // g) * g)  # a last, partial group is padded with never-firing features
        padded[: len(base)] = base
        log_miss = np.log1p(-self.group_coactivation * padded).reshape(-1, g)
        others = (log_miss.sum(axis=1, keepdims=True) - log_miss).reshape(-1)[: len(base)]
        return 1.0 - (1.0 - base) * np.exp(others)

    def _base_probs(self, weights: np.ndarray) -> np.ndarray:
        """Base firing probabilities min(c * w_i, 1) with c bisected to hit the expected active count."""
        lo, hi = 0.0, 1.0 / weights.min()  # at hi every feature always fires
        for _ in range(100):
            mid = (lo + hi) / 2
            if self._marginal(np.minimum(mid * weights, _P_MAX)).sum() < self.active_per_vector:
                lo = mid
            else:
                hi = mid
        return np.minimum(hi * weights, _P_MAX)

    def _magnitudes(self, gen: torch.Generator, shape: torch.Size) -> torch.Tensor:
        if self.magnitude == "constant":
            return torch.ones(shape)
        if self.magnitude == "lognormal":
            return torch.exp(_LOGNORMAL_SIGMA * torch.randn(shape, generator=gen) - _LOGNORMAL_SIGMA**2 / 2)
        u = torch.rand(shape, generator=gen)
        return -torch.log1p(-u) if self.magnitude == "exponential" else 2.0 * (1.0 - u)

    def _generate(self, gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        counts = torch.poisson(torch.full((n,), self._draw_rate, dtype=torch.float64), generator=gen)
        width = max(int(counts.max()), 1)
        draws = torch.searchsorted(self._cdf, torch.rand(n, width, generator=gen, dtype=torch.float64))
        live = torch.arange(width) < counts[:, None]
        draws.clamp_(max=self.n_features - 1)  # the float64 cdf may end just below 1
        # repeats go before co-activation so a feature drawn twice gets one chance per group member
        idx, live = _drop_repeats(draws, live, self.n_features)
        g = self.correlated_group_size
        if g > 1:
            members = idx[..., None] // g * g + torch.arange(g)
            fires = (members == idx[..., None]) | (torch.rand(members.shape, generator=gen) < self.group_coactivation)
            live = live[..., None] & fires & (members < self.n_features)
            idx, live = _drop_repeats(members.flatten(1), live.flatten(1), self.n_features)
        coef = self._magnitudes(gen, idx.shape) * live
        x = F.embedding_bag(idx, self.features, per_sample_weights=coef, mode="sum")
        if self.noise_std > 0:
            x += self.noise_std * torch.randn(n, self.d_in, generator=gen)
        return x, idx, coef

    def train_batch_with_codes(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x [B, d_in], idx [B, L] int64, coef [B, L] float32) with x = sum_l coef[:, l] * features[idx[:, l]]
        + noise; coef is 0 in unused slots, and the live indices of a row are distinct."""
        return self._generate(_generator(self.seed, _TRAIN, step), batch_size)

    def train_batch(self, step: int, batch_size: int) -> torch.Tensor:
        return self.train_batch_with_codes(step, batch_size)[0]

    def eval_set(self) -> torch.Tensor:
        if self._eval is None:
            self._eval = self._generate(_generator(self.seed, _EVAL), self.n_eval)[0]
        return self._eval


def mmcs(decoder_rows: torch.Tensor, features: torch.Tensor) -> float:
    """Mean over true features of the max cosine similarity with any decoder row."""
    dec = F.normalize(decoder_rows.detach().float(), dim=1)
    feats = F.normalize(features.detach().to(dec.device, torch.float32), dim=1)
    chunk = max(1, 2**24 // dec.shape[0])  # bounds the [chunk, n_latents] similarity block to 64 MiB
    best = torch.cat([(block @ dec.T).max(dim=1).values for block in feats.split(chunk)])
    return best.mean().item()
