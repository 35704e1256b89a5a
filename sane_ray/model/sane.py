"""The SANE autoencoder: token windows -> per-token latents -> reconstructed tokens.

Plain ``nn.Module`` with no data loading or distribution code; parallelism is applied
from outside (``sane_ray.train.fsdp``). Training goes through :meth:`SaneModel.forward`
(one call per step, both views stacked in the batch), which is also what FSDP's root
hooks wrap; ``encode``/``decode`` are for inference.

``token_mask`` (B, ws) marks real tokens: windows of models shorter than the window
end in padding tokens, which no token attends to and the projection does not pool.
Outputs at padding positions are meaningless (the loss masks them out).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from sane_ray.model.config import SaneConfig
from sane_ray.model.layers import Block, PositionEmbedding, ProjectionHead
from sane_ray.model.linear import Linear


class SaneOutput(NamedTuple):
    z: torch.Tensor  # (B, ws, d_z) per-token latents
    x_hat: torch.Tensor  # (B, ws, d_t) reconstructed tokens
    projection: torch.Tensor  # (B, projection_dim) one vector per window, for the contrastive loss


class TokenTransformer(nn.Module):
    """Linear in, 3-d position embedding, pre-LN blocks, final LayerNorm, Linear out.

    The encoder maps tokens (d_t) to latents (d_z); the decoder is the same stack from
    d_z back to d_t, with its own position tables.
    """

    def __init__(self, d_in: int, d_out: int, cfg: SaneConfig):
        super().__init__()
        self.inp = Linear(d_in, cfg.d_model)
        self.pos = PositionEmbedding(cfg.d_model, cfg.max_positions)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_heads, cfg.dropout) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=False)
        self.out = Linear(cfg.d_model, d_out)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.drop(self.inp(x) + self.pos(pos))
        for block in self.blocks:
            h = block(h, key_mask)
        return self.out(self.ln_f(h))


class SaneModel(nn.Module):
    """Sequential autoencoder over weight tokens, with a projection head for contrastive guidance."""

    def __init__(self, cfg: SaneConfig):
        super().__init__()
        if cfg.d_t <= 0:
            raise ValueError("SaneConfig.d_t is 0 (taken from the data): set the token size before building a model")
        self.cfg = cfg
        self.encoder = TokenTransformer(cfg.d_t, cfg.d_z, cfg)
        self.decoder = TokenTransformer(cfg.d_z, cfg.d_t, cfg)
        self.head = ProjectionHead(cfg.d_z, cfg.projection_dim)
        self.apply(_init_weights)
        residual_std = 0.02 / math.sqrt(2 * cfg.n_layers)
        for block in self.transformer_blocks():
            nn.init.normal_(block.out_proj.weight, std=residual_std)
            nn.init.normal_(block.fc_out.weight, std=residual_std)

    def transformer_blocks(self) -> list[Block]:
        """Encoder then decoder blocks: the units FSDP shards one by one."""
        return [*self.encoder.blocks, *self.decoder.blocks]

    def encode(self, x: torch.Tensor, pos: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens (B, ws, d_t) at positions (B, ws, 3) -> latents (B, ws, d_z)."""
        self._check_shapes(x, pos, self.cfg.d_t, "tokens", "SaneConfig.d_t", token_mask)
        return self.encoder(x, pos, key_padding_mask(token_mask))

    def decode(self, z: torch.Tensor, pos: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Latents (B, ws, d_z) at positions (B, ws, 3) -> tokens (B, ws, d_t)."""
        self._check_shapes(z, pos, self.cfg.d_z, "latents", "SaneConfig.d_z", token_mask)
        return self.decoder(z, pos, key_padding_mask(token_mask))

    def project(self, z: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One projection per window from its latents; ``token_mask`` (B, ws) marks real tokens."""
        return self.head(z, token_mask)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, token_mask: torch.Tensor | None = None) -> SaneOutput:
        self._check_shapes(x, pos, self.cfg.d_t, "tokens", "SaneConfig.d_t", token_mask)
        key_mask = key_padding_mask(token_mask)  # decided once for both stacks (one host sync)
        z = self.encoder(x, pos, key_mask)
        return SaneOutput(z, self.decoder(z, pos, key_mask), self.project(z, token_mask))

    @staticmethod
    def _check_shapes(
        x: torch.Tensor, pos: torch.Tensor, width: int, what: str, setting: str, token_mask: torch.Tensor | None
    ) -> None:
        if x.dim() != 3 or x.shape[-1] != width:
            raise ValueError(f"{what} must have shape (B, ws, {width}) for {setting}={width}, got {tuple(x.shape)}")
        if tuple(pos.shape) != (*x.shape[:2], 3):
            raise ValueError(f"positions must have shape {(*x.shape[:2], 3)} to match the {what}, got {tuple(pos.shape)}")
        if token_mask is not None and (token_mask.dtype != torch.bool or token_mask.shape != x.shape[:2]):
            raise ValueError(
                f"token_mask must be a bool tensor of shape {tuple(x.shape[:2])}, got {token_mask.dtype} "
                f"{tuple(token_mask.shape)}"
            )


def key_padding_mask(token_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The attention key mask for ``token_mask`` (B, ws): None when no window has padding.

    A window without any real token keeps all its keys, so attention never normalizes
    over an empty set (which would give NaN).
    """
    if token_mask is None or bool(token_mask.all()):
        return None
    return token_mask | ~token_mask.any(dim=-1, keepdim=True)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def configure_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.95)
) -> torch.optim.AdamW:
    """AdamW that decays only matrices and embedding tables (2-d+), not norms or biases.

    The fused implementation updates all parameters in one kernel per step (also for
    FSDP2's sharded parameters); the per-parameter loop costs ~10% of a CPU step.
    Build it after FSDP has sharded the model so it holds the sharded parameters.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=True)
