"""Per-token distributions over SANE latents, drawn independently per token (paper eq. 7).

A :class:`TokenKDE` holds anchors (P, N, d): P token-latent sequences (the prompts' haloed
encodings, or kept candidates' latents when bootstrapping) over N token positions. Token n
of a draw is a Gaussian KDE draw over the P anchors of position n: pick an anchor index
uniformly, add ``bandwidth[n] * eps``. With ``anchor="token"`` (the paper's per-token KDE)
both the index and the noise are drawn per token and per latent entry, so tokens of one
candidate come from different anchors and carry independent noise. (The reference fits one
scikit-learn KDE per token and calls ``sample(random_state=42)`` on each, so every token
picks the same anchor and the same noise pattern: its candidates are one anchor plus one
shared noise.) ``anchor="model"`` picks one anchor per candidate and keeps the noise
independent per token and entry: a KDE over whole sequences. On a digits zoo mixing
tokens of different prompts gives incoherent networks (near chance zero-shot, see
docs/sampling.md), one anchor per candidate does not.

Every candidate has its own seed, so a candidate is the same whichever task draws it, in
whatever batch; :meth:`TokenKDE.sample` writes straight into one float32 output (noise is
generated in place a cache-sized chunk at a time and the picked anchors are added in the
same pass), so a draw of K candidates needs the output plus one chunk per thread.

The Gaussian prior (the paper's SANE_GAUSS, for small models without prompts) is the same
object with one all-zero anchor and bandwidth ``gauss_std``: N(0, gauss_std^2) per entry.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from sane_ray.sample.config import ANCHORS, BANDWIDTH_RULES

# Noise is generated and shifted in chunks of this many floats: they stay in cache between
# the two passes, and torch's normal fill runs ~1.8x faster on cache-sized tensors (440 vs
# 240 M normals/s per core here) than on one 20 MB candidate at once.
NOISE_CHUNK = 32768


def rule_factor(rule: str, count: int, dim: int) -> float:
    """Scott's ``n^(-1/(d+4))`` or Silverman's ``(n (d+2) / 4)^(-1/(d+4))`` for ``count`` points in ``dim`` dims."""
    if rule == "scott":
        return count ** (-1.0 / (dim + 4))
    if rule == "silverman":
        return (count * (dim + 2) / 4.0) ** (-1.0 / (dim + 4))
    raise ValueError(f"bandwidth rule must be one of {', '.join(BANDWIDTH_RULES)}, got {rule!r}")


class TokenKDE:
    """A Gaussian KDE per token position; ``bandwidth`` is a float or float32 (N, d) (per token and dim).

    ``anchor`` has no default here: its default lives in ``SampleConfig.kde_anchor``."""

    def __init__(self, anchors: torch.Tensor, bandwidth: float | torch.Tensor, *, anchor: str):
        if anchor not in ANCHORS:
            raise ValueError(f"anchor must be one of {', '.join(ANCHORS)}, got {anchor!r}")
        self.anchor = anchor
        if anchors.dim() != 3 or anchors.shape[0] < 1:
            raise ValueError(f"anchors must have shape (P >= 1, N, d), got {tuple(anchors.shape)}")
        self.anchors = anchors.detach().to(torch.float32).contiguous()
        if isinstance(bandwidth, torch.Tensor):
            bandwidth = bandwidth.detach().to(torch.float32).contiguous()
            if tuple(bandwidth.shape) != tuple(self.anchors.shape[1:]):
                raise ValueError(f"bandwidth must have shape {tuple(self.anchors.shape[1:])}, got {tuple(bandwidth.shape)}")
        elif not bandwidth > 0:
            raise ValueError(f"bandwidth must be > 0, got {bandwidth!r}")
        self.bandwidth = bandwidth

    @classmethod
    def fit(cls, anchors: torch.Tensor, rule: str = "silverman", bandwidth: float = 0.0, *,
            anchor: str) -> TokenKDE:
        """A KDE over ``anchors`` (P, N, d): a fixed ``bandwidth`` > 0, else ``rule`` applied to the
        anchors' std (ddof 1) per token and latent dimension (a constant entry gets a tiny floor)."""
        if bandwidth > 0:
            return cls(anchors, float(bandwidth), anchor=anchor)
        p = anchors.shape[0]
        if p < 2:
            raise ValueError(f"a bandwidth rule needs at least 2 anchors, got {p}; set bandwidth > 0 "
                             "(sample.bandwidth) or give more prompts")
        std = anchors.to(torch.float32).std(dim=0, correction=1)
        return cls(anchors, (std * rule_factor(rule, p, anchors.shape[2])).clamp_(min=1e-6), anchor=anchor)

    @classmethod
    def gaussian(cls, num_tokens: int, dim: int, std: float) -> TokenKDE:
        """The Gaussian prior N(0, std^2) per latent entry (one zero anchor)."""
        return cls(torch.zeros(1, num_tokens, dim), float(std), anchor="model")  # one anchor: either mode

    @property
    def num_tokens(self) -> int:
        return int(self.anchors.shape[1])

    @property
    def dim(self) -> int:
        return int(self.anchors.shape[2])

    def mean_bandwidth(self) -> float:
        bw = self.bandwidth
        return float(bw.mean()) if isinstance(bw, torch.Tensor) else float(bw)

    def sample(self, seeds: Sequence[int], out: torch.Tensor | None = None, threads: int | None = None) -> torch.Tensor:
        """Latents (K, N, d) float32 of K candidates, candidate i drawn from ``seeds[i]`` alone.

        Candidates are split over ``threads`` Python threads (default: torch's thread count;
        torch releases the GIL, and the result does not depend on the split).
        """
        _, n, d = self.anchors.shape
        if out is None:
            out = torch.empty(len(seeds), n, d)
        elif tuple(out.shape) != (len(seeds), n, d) or out.dtype != torch.float32:
            raise ValueError(f"out must be float32 {(len(seeds), n, d)}, got {out.dtype} {tuple(out.shape)}")
        threads = max(1, min(threads or torch.get_num_threads(), len(seeds)))
        if threads == 1:
            self._draw(seeds, out, range(len(seeds)))
            return out
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda rows: self._draw(seeds, out, rows), [range(t, len(seeds), threads) for t in range(threads)]))
        return out

    def _draw(self, seeds: Sequence[int], out: torch.Tensor, rows: range) -> None:
        p, n, d = self.anchors.shape
        flat = self.anchors.view(p * n, d)
        step = max(1, NOISE_CHUNK // d)  # tokens per chunk
        picked = torch.empty(step, d) if p > 1 and self.anchor == "token" else None
        per_token = isinstance(self.bandwidth, torch.Tensor)
        position = torch.arange(n)
        for i in rows:
            gen = torch.Generator().manual_seed(int(seeds[i]))
            row = out[i]
            if picked is not None:  # one anchor per token: flat row index of (anchor, position)
                index = torch.randint(p, (n,), generator=gen).mul_(n).add_(position)
            else:
                base = self.anchors[int(torch.randint(p, (1,), generator=gen)) if p > 1 else 0]
            for start in range(0, n, step):
                stop = min(n, start + step)
                chunk = row[start:stop]
                chunk.normal_(generator=gen)
                if picked is not None:
                    anchor = torch.index_select(flat, 0, index[start:stop], out=picked[: stop - start])
                else:
                    anchor = base[start:stop]
                if per_token:
                    torch.addcmul(anchor, chunk, self.bandwidth[start:stop], out=chunk)
                else:
                    torch.add(anchor, chunk, alpha=self.bandwidth, out=chunk)
