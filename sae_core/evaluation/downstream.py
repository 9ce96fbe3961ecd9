"""Downstream loss: what happens to the model when the SAE's reconstruction replaces the hooked activation.

The model runs on held-out token rows twice per batch and splice: clean, and with the site's value at one
layer replaced at every position that is not excluded (special tokens, dropped leading positions keep
their originals exactly). For resid_post_ln the reconstruction is mapped back into the residual stream with
each token's own normalisation statistics (`ActivationExtractor.from_site`), so splicing the exact
activation changes nothing.

Causal LMs (every next-token prediction of every row counts):
  CE             = mean over predictions of -log p(next token)
  downstream_loss = CE_spliced - CE_orig                              (ΔCE, nats/token)
  downstream_kl   = mean over predictions of KL(p_orig ‖ p_spliced)   (summed over the vocabulary)
  ce_loss_score   = (CE_zero - CE_sae) / (CE_zero - CE_orig)          (1 = perfect, 0 = as bad as zeros)
Encoders (sentence embeddings, e.g. the embedded MiniLM):
  downstream_loss = mean over rows of 1 - cos(pool(h_orig), pool(h_spliced)), pool = mean over the row's tokens
  of the last hidden state (sentence-transformers' pooling); KL and CE are null.
Zero ablation splices zeros in the site's space, mean ablation the site's mean over the held-out positions.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sae_core.errors import DataError
from sae_core.lm import ActivationExtractor, LoadedModel
from sae_core.sae import SAE

Replace = Callable[[torch.Tensor], torch.Tensor]  # site vectors [n, d] float32 -> replacement [n, d]


@dataclass
class Spliced:
    loss: float  # ΔCE (causal) or mean cosine distance of pooled embeddings (encoder)
    kl: float | None  # causal only
    ce: float | None  # causal only: CE with the splice


class DownstreamEval:
    """Splicing evaluations on a fixed set of held-out token rows of one model and hook site."""

    def __init__(self, lm: LoadedModel, site: str, layers: list[int], tokens: np.ndarray, excluded: np.ndarray,
                 batch_tokens: int = 4096):
        self.lm, self.site = lm, site
        self.extractor = ActivationExtractor(lm.model, site, layers)
        self.device = next(lm.model.parameters()).device
        self.tokens = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
        self.positions = torch.from_numpy(~np.asarray(excluded, dtype=bool))
        self.batch_rows = max(1, batch_tokens // self.tokens.shape[1])
        self.metric = "ce" if lm.causal else "embedding_cosine"
        self._means: dict[int, torch.Tensor] = {}

    @property
    def n_tokens(self) -> int:
        return int(self.positions.sum())

    def _batches(self):
        for lo in range(0, len(self.tokens), self.batch_rows):
            yield (self.tokens[lo:lo + self.batch_rows].to(self.device),
                   self.positions[lo:lo + self.batch_rows].to(self.device))

    def check(self, sae: SAE, layer: int) -> None:
        """The SAE must read this model's hook: same width, and the model / site / layer it was trained on."""
        here = f"{self.lm.name} {self.site} layer {layer} (d_model {self.extractor.d_model})"
        hook = sae.meta.get("hook")
        trained = (f"{hook['model']} {hook['site']} layers {hook['layers']} (d_in {sae.cfg.d_in})" if hook
                   else f"d_in {sae.cfg.d_in}")
        mismatch = sae.cfg.d_in != self.extractor.d_model or (hook is not None and (
            hook["model"] != self.lm.name or hook["site"] != self.site or layer not in hook["layers"]))
        if mismatch:
            raise DataError(f"evaluation hook {here} does not match the SAE's: trained on {trained}")

    def site_mean(self, layer: int) -> torch.Tensor:
        """Mean of the site's value over the held-out positions (the mean-ablation vector)."""
        if layer not in self._means:
            total, count = 0.0, 0
            extract = ActivationExtractor(self.lm.model, self.site, [layer])
            for ids, pos in self._batches():
                acts = extract(ids)[0][pos]
                total, count = total + acts.double().sum(dim=0), count + len(acts)
            self._means[layer] = (total / count).float()
        return self._means[layer]

    def _output(self, out) -> torch.Tensor:
        """Log-probabilities of each next token [B, T-1, V] (causal), or pooled unit embeddings [B, d]."""
        if self.lm.causal:
            return F.log_softmax(out.logits[:, :-1].float(), dim=-1)
        return F.normalize(out.last_hidden_state.float().mean(dim=1), dim=-1)

    @torch.inference_mode()
    def measure(self, splices: dict[object, tuple[int, Replace]]) -> tuple[float | None, dict[object, Spliced]]:
        """CE of the clean model (None for encoders) and each named splice (layer, replace), from one clean
        forward per batch shared by every splice."""
        clean_ce, n_pred, n_rows = 0.0, 0, 0
        sums = {name: [0.0, 0.0, 0.0] for name in splices}  # CE, KL, cosine distance
        for ids, pos in self._batches():
            clean = self._output(self.lm.model(input_ids=ids))
            target = ids[:, 1:, None]
            if self.lm.causal:
                clean_ce -= float(clean.gather(-1, target).double().sum())
                n_pred += target.numel()
            n_rows += len(ids)
            for name, (layer, replace) in splices.items():
                new = self._output(self.extractor.run_spliced(ids, layer, pos, replace))
                acc = sums[name]
                if self.lm.causal:
                    acc[0] -= float(new.gather(-1, target).double().sum())
                    acc[1] += float((clean.exp() * (clean - new)).sum(dim=-1).double().sum())
                else:
                    acc[2] += float((1 - (clean * new).sum(dim=-1)).double().sum())
        if not self.lm.causal:
            return None, {name: Spliced(s[2] / n_rows, None, None) for name, s in sums.items()}
        base = clean_ce / n_pred
        return base, {name: Spliced(s[0] / n_pred - base, s[1] / n_pred, s[0] / n_pred) for name, s in sums.items()}


def reconstruction(sae: SAE, encode: Callable | None = None) -> Replace:
    """The splice of an SAE's reconstruction (or of a test-time activation through `encode`), on the SAE's device."""
    encode = encode or sae.encode_code
    device = sae.net.W_dec.device

    def replace(v: torch.Tensor) -> torch.Tensor:
        return sae.decode(*encode(v.to(device))).float().to(v.device)
    return replace


def zeros(v: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(v)


def constant(vector: torch.Tensor) -> Replace:
    return lambda v: vector.to(v.device).expand_as(v)


DOWNSTREAM_COLUMNS = ("downstream_metric", "downstream_loss", "downstream_kl", "downstream_zero_ablation",
                      "downstream_mean_ablation", "ce_orig", "ce_sae", "ce_zero_ablation", "ce_mean_ablation",
                      "ce_loss_score", "downstream_tokens", "downstream_null_reason")


def null_downstream(reason: str) -> dict:
    """Downstream columns of a run that has no model to splice into: null, with the reason."""
    return {**dict.fromkeys(DOWNSTREAM_COLUMNS), "downstream_null_reason": reason}


def downstream_row(metric: str, n_tokens: int, clean_ce: float | None, sae: Spliced, zero: Spliced,
                   mean: Spliced) -> dict:
    """The runs-table downstream columns from the SAE splice and the two ablations of one layer."""
    causal = clean_ce is not None
    score = None
    if causal and zero.ce != clean_ce:
        score = (zero.ce - sae.ce) / (zero.ce - clean_ce)
    return {"downstream_metric": metric, "downstream_loss": sae.loss, "downstream_kl": sae.kl,
            "downstream_zero_ablation": zero.loss, "downstream_mean_ablation": mean.loss,
            "ce_orig": clean_ce, "ce_sae": sae.ce, "ce_zero_ablation": zero.ce, "ce_mean_ablation": mean.ce,
            "ce_loss_score": score, "downstream_tokens": n_tokens, "downstream_null_reason": None}
