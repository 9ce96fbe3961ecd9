"""Hook points on Hugging Face transformers, found structurally (no per-model tables):

  resid_pre      the residual stream entering block L (= output_hidden_states[L])
  resid_post     the residual stream leaving block L
  resid_post_ln  what the next component actually reads: resid_post normalised by the next norm with its
                 gain and bias left out (Gao et al.: "after the layernorm, with layernorm weights folded
                 into the attention weights"). Pre-LN models (GPT-2, Pythia, Llama, Gemma): LayerNorm or
                 RMSNorm of resid_post with the next norm's eps (the final norm after the last block).
                 Post-LN encoders (BERT, MiniLM): the block ends in a LayerNorm, so this is its normalised
                 value, (resid_post - beta) / gamma.
  mlp_out        the MLP's output before it is added to the residual stream

The blocks are the ModuleList with one entry per layer. The forward pass stops right after the deepest
hooked module has run (early exit), so hooking layer 2 of a 24-layer model costs 3 blocks.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from sae_core.errors import DataError

SITES = ("resid_pre", "resid_post", "resid_post_ln", "mlp_out")


class _StopForward(Exception):
    """Raised by the last hook to end the forward pass early."""


def _n_layers(model: nn.Module) -> int:
    cfg = model.config
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(cfg, key, None), int):
            return getattr(cfg, key)
    raise DataError(f"model {type(model).__name__}: its config names no layer count")


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, nn.LayerNorm) or "rmsnorm" in type(m).__name__.lower()


def _tensor(out):
    return out[0] if isinstance(out, (tuple, list)) else out


class ActivationExtractor:
    """Runs a model on token ids and returns the hooked activations as [layers, B, T, d] float32."""

    def __init__(self, model: nn.Module, site: str, layers: list[int]):
        if site not in SITES:
            raise DataError(f"hook.site: {site!r} is not a hook point; allowed: {', '.join(SITES)}")
        self.model, self.site = model, site
        self.n_layers = _n_layers(model)
        bad = [layer for layer in layers if not 0 <= layer < self.n_layers]
        if bad or not layers:
            raise DataError(f"hook.layers: {bad or layers} out of range; {type(model).__name__} has "
                            f"{self.n_layers} layers, allowed: 0..{self.n_layers - 1} or 'all'")
        self.layers = sorted(set(layers))
        self.blocks = next((m for _, m in model.named_modules()
                            if isinstance(m, nn.ModuleList) and len(m) == self.n_layers), None)
        if self.blocks is None:
            raise DataError(f"model {type(model).__name__}: no list of {self.n_layers} blocks found")
        self.post_ln = self._post_ln_norm(self.blocks[0]) is not None
        self.d_model = model.config.hidden_size

    # --- where each site lives -----------------------------------------------------------------
    @staticmethod
    def _post_ln_norm(block: nn.Module) -> nn.Module | None:
        """A post-LN block (BERT) ends in `output.LayerNorm`; pre-LN blocks have no such module."""
        out = getattr(block, "output", None)
        return getattr(out, "LayerNorm", None) if isinstance(out, nn.Module) else None

    def _next_norm(self, layer: int) -> nn.Module:
        """The norm that reads resid_post of `layer` in a pre-LN model."""
        if layer + 1 < self.n_layers:
            norm = next((m for m in self.blocks[layer + 1].children() if _is_norm(m)), None)
        else:
            inside = {id(m) for m in self.blocks.modules()}
            norm = [m for m in self.model.modules() if _is_norm(m) and id(m) not in inside]
            norm = norm[-1] if norm else None
        if norm is None:
            raise DataError(f"hook.site: resid_post_ln: no norm reads layer {layer}'s output in "
                            f"{type(self.model).__name__}; use resid_post")
        return norm

    def _mlp(self, layer: int) -> nn.Module:
        block = self.blocks[layer]
        if self.post_ln:  # BERT: the FFN's second linear layer, before the residual add and LayerNorm
            return block.output.dense
        mlp = getattr(block, "mlp", None) or getattr(block, "feed_forward", None)
        if mlp is None:
            raise DataError(f"hook.site: mlp_out: block {layer} of {type(self.model).__name__} has no `mlp`; "
                            f"allowed sites here: resid_pre, resid_post, resid_post_ln")
        return mlp

    def _site_affine(self, layer: int, raw: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """(shift, scale) with site value = (raw - shift) / scale, per token: one map for both directions,
        so a reconstruction in the site's space goes back into the model exactly where the original was."""
        if self.site != "resid_post_ln":
            return 0.0, 1.0
        if self.post_ln:
            norm = self._post_ln_norm(self.blocks[layer])
            return norm.bias.float(), norm.weight.float()
        norm = self._next_norm(layer)
        eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", 1e-6)
        if isinstance(norm, nn.LayerNorm):
            return raw.mean(dim=-1, keepdim=True), (raw.var(dim=-1, unbiased=False, keepdim=True) + eps).sqrt()
        return 0.0, (raw.pow(2).mean(dim=-1, keepdim=True) + eps).sqrt()

    def to_site(self, layer: int, raw: torch.Tensor) -> torch.Tensor:
        """The hooked module's output (float32) as the SAE sees it."""
        shift, scale = self._site_affine(layer, raw)
        return (raw - shift) / scale

    def from_site(self, layer: int, value: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        """Inverse of `to_site`, with the per-token statistics of the original output `raw`."""
        shift, scale = self._site_affine(layer, raw)
        return value * scale + shift

    def _register(self, layer: int, fn):
        """Hook the site of `layer`: fn(raw output) returns a replacement or None (observe only)."""
        if self.site == "resid_pre":
            def pre(module, args, kwargs):
                new = fn(args[0] if args else kwargs["hidden_states"])
                if new is None:
                    return None
                return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})
            return self.blocks[layer].register_forward_pre_hook(pre, with_kwargs=True)
        module = self._mlp(layer) if self.site == "mlp_out" else self.blocks[layer]

        def post(module, args, out):
            new = fn(_tensor(out))
            if new is None or not isinstance(out, (tuple, list)):
                return new
            return type(out)((new, *out[1:]))
        return module.register_forward_hook(post)

    # --- running -----------------------------------------------------------------------------
    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        captured: dict[int, torch.Tensor] = {}
        deepest = self.layers[-1]

        def keep(layer):
            def store(value):
                captured[layer] = value.float()
                if layer == deepest:
                    raise _StopForward
            return store

        handles = [self._register(layer, keep(layer)) for layer in self.layers]
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return torch.stack([self.to_site(layer, captured[layer]) for layer in self.layers])

    @torch.inference_mode()
    def run_spliced(self, input_ids: torch.Tensor, layer: int, positions: torch.Tensor,
                    replace: Callable[[torch.Tensor], torch.Tensor], attention_mask: torch.Tensor | None = None):
        """The full model's output with the site's value at `layer` replaced, where positions [B, T] is True,
        by replace(site vectors [n, d] float32) -> [n, d]. Every other position keeps its original exactly."""
        keep = positions[..., None]

        def swap(raw: torch.Tensor) -> torch.Tensor:
            original = raw.float()
            site = self.to_site(layer, original)
            site = site.masked_scatter(keep, replace(site[positions]).to(site.dtype))
            return torch.where(keep, self.from_site(layer, site, original).to(raw.dtype), raw)

        handle = self._register(layer, swap)
        try:
            return self.model(input_ids=input_ids, attention_mask=attention_mask)
        finally:
            handle.remove()
