"""Align a model to a reference by permuting hidden units (git re-basin weight matching).

For every permutation group ``P`` the objective ``sum <W_ref, W_model permuted>`` is
linear in ``P`` once all other groups are fixed:
``A = sum over the group's tensors of W_ref(axis->0).reshape(n, -1) @ W_model(axis->0,
other groups applied).reshape(n, -1).T``, and the best ``P`` solves a linear assignment
on ``A``. Coordinate descent visits the groups in a fresh random order each sweep and
stops after a sweep without improvement (Ainsworth et al., 2022).

This implementation follows the same iterates as the textbook loop (same group order
per seed, same stopping rule) with far less work. Reference and model tensors are
rearranged once. Each tensor's contribution to ``A`` is cached and touched again only
when the permutation of the tensor's *other* group changed since: if few units moved,
by a low-rank correction over just those units (``R[:, S] (M[:, new[S]] - M[:, old[S]])^T``),
otherwise by a fresh product. Tensors with no other group (BatchNorm vectors, biases,
the last layer) are multiplied once. When nothing feeding ``A`` changed since the
group's last assignment, the assignment (which would return the same permutation) is
skipped, so late sweeps are nearly free. Each assignment is warm-started from the
prices of the group's previous optimum (:mod:`sane_ray.weights.assignment`: a sparse
solve proved optimal for the full matrix, about 2x cheaper than a dense solve). Corrections
change ``A`` only by float32 rounding, and a proved optimum is the dense solver's unless
two assignments tie, so results equal the textbook loop's except at near-ties.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment

from sane_ray.weights.assignment import Duals, max_assignment
from sane_ray.weights.perm_spec import PermutedAxis
from sane_ray.weights.permutation import (
    PermutationSpec,
    Perms,
    SpecMismatchError,
    apply_permutation,
    identity_permutation,
    leading_dims,
    stack_state_dicts,
    unstack_state_dict,
)

IMPROVEMENT_TOL = 1e-12


@dataclass(frozen=True)
class Matching:
    """Result of weight matching: permutations (``aligned = apply_permutation(model, spec, perms)``)."""

    perms: Perms
    sweeps: int
    converged: bool  # False if max_sweeps ended the descent


def units_first(t: torch.Tensor, axis: int, pa: PermutedAxis) -> torch.Tensor:
    """``t`` with the units of ``axis`` (permuted by ``pa``) first, as (units * block, ...).

    The axis is split into (parts, units * block) and the second factor moved to the front,
    so viewing the result as (units, -1) gives each unit's entries in every part; every
    other axis ``d`` of ``t`` is dim ``d + 1`` of the result.
    """
    return t.unflatten(axis, (pa.parts, -1)).movedim(axis + 1, 0)


@dataclass(frozen=True)
class _Term:
    """One tensor axis of a group: reference and model tensors with that axis's units moved first.

    ``others`` lists the tensor's other permuted axes as (dim in the moved tensors, axis,
    group size). ``ref_rows`` views the reference as (units, -1).
    """

    key: str
    ref: torch.Tensor
    model: torch.Tensor
    ref_rows: torch.Tensor
    others: tuple[tuple[int, PermutedAxis, int], ...]

    @property
    def other_groups(self) -> tuple[str, ...]:
        return tuple(pa.group for _, pa, _ in self.others)

    def full(self, perms: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """This tensor's contribution to ``A``; other groups missing from ``perms`` are the identity."""
        m = self.model
        for dim, pa, n in self.others:
            if pa.group in perms:
                m = m.index_select(dim, pa.index(perms[pa.group], n))
        return self.ref_rows @ m.reshape(self.ref_rows.shape[0], -1).T

    def delta(self, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """Change of the contribution when the (single) other permutation goes from ``old`` to ``new``.

        Only the reordered units enter: ``sum over changed a of R[:, a] (M[:, new[a]] - M[:, old[a]])^T``.
        """
        (dim, pa, n_other), = self.others
        changed = (old != new).nonzero().squeeze(1)
        n = self.ref_rows.shape[0]
        r = self.ref.index_select(dim, pa.index(changed, n_other)).reshape(n, -1)
        m_new = self.model.index_select(dim, pa.index(new[changed], n_other))
        m_old = self.model.index_select(dim, pa.index(old[changed], n_other))
        return r @ (m_new - m_old).reshape(n, -1).T


def _float_tensors(sd: Mapping[str, torch.Tensor], spec: PermutationSpec, what: str) -> dict[str, torch.Tensor]:
    if leading_dims(sd, spec, what):
        raise SpecMismatchError(f"{what}: weight matching needs one checkpoint, got a stack")
    out = {}
    for key in spec.permuted_keys:
        t = sd[key].detach()
        if not t.is_floating_point():
            raise SpecMismatchError(f"{what}: {key!r} has dtype {t.dtype}, weight matching needs floats")
        out[key] = t.to("cpu", torch.float32)  # matching is CPU work: the assignments run in scipy
    return out


def _terms(
    spec: PermutationSpec, ref: Mapping[str, torch.Tensor], model: Mapping[str, torch.Tensor]
) -> dict[str, list[_Term]]:
    terms: dict[str, list[_Term]] = {}
    for group, members in spec.members.items():
        n = spec.group_sizes[group]
        terms[group] = []
        for key, axis, unit_axis in members:
            others = tuple(
                (d + 1, pa, spec.group_sizes[pa.group])
                for d, pa in enumerate(spec.axes[key])
                if pa is not None and d != axis
            )
            r = units_first(ref[key], axis, unit_axis).contiguous()
            m = units_first(model[key], axis, unit_axis).contiguous()
            terms[group].append(_Term(key, r, m, r.reshape(n, -1), others))
    return terms


def _check_finite(group: str, a: torch.Tensor, terms: Sequence[_Term]) -> None:
    """Non-finite weights make ``A`` non-finite; only then search for the key to name.

    ``a`` is float64: its sum overflows only if an entry is non-finite (one reduction
    instead of a full-size mask).
    """
    if torch.isfinite(a.sum()):
        return
    for term in terms:
        for what, t in (("reference state dict", term.ref), ("state dict", term.model)):
            if not torch.isfinite(t).all():
                raise SpecMismatchError(f"{what}: {term.key!r} contains NaN or infinite values")
    raise SpecMismatchError(f"weight matching overflowed in group {group!r}: the weights are too large")


# a cached contribution is updated by a delta while at most this fraction of units moved
DELTA_FRACTION = 0.5


def match_weights(
    spec: PermutationSpec,
    ref_sd: Mapping[str, torch.Tensor],
    sd: Mapping[str, torch.Tensor],
    max_sweeps: int = 100,
    seed: int = 0,
) -> Matching:
    """Permutations bringing ``sd`` closest (L2) to ``ref_sd``, with sweep count (see module doc)."""
    if max_sweeps < 1:
        raise ValueError(f"max_sweeps must be >= 1, got {max_sweeps}")
    terms = _terms(spec, _float_tensors(ref_sd, spec, "reference state dict"), _float_tensors(sd, spec, "state dict"))
    state = _Sweeps(spec, terms)
    order_gen = torch.Generator().manual_seed(seed)
    sweeps, converged = 0, False
    while sweeps < max_sweeps and not converged:
        sweeps += 1
        progress = False
        for gi in torch.randperm(len(state.groups), generator=order_gen).tolist():
            progress = state.reassign(state.groups[gi]) or progress
        converged = not progress
    return Matching(state.perms, sweeps, converged)


class _Sweeps:
    """The coordinate descent's state: each group's permutation and version, and cached contributions."""

    def __init__(self, spec: PermutationSpec, terms: dict[str, list[_Term]]):
        self.spec, self.terms = spec, terms
        self.groups = list(spec.group_sizes)
        self.perms = identity_permutation(spec, device="cpu")
        self.version = dict.fromkeys(self.groups, 0)  # bumped whenever a group's permutation changes
        # (group, term index) -> (other groups' versions, their permutations, contribution)
        self.cache: dict[tuple[str, int], tuple[tuple[int, ...], tuple[torch.Tensor, ...], torch.Tensor]] = {}
        self.solved_at: dict[str, tuple[int, ...]] = {}  # neighbour versions at the group's last assignment
        self.duals: dict[str, Duals | None] = {}  # the group's last optimum's prices: warm-start the next one

    def contribution(self, group: str, i: int, term: _Term) -> torch.Tensor:
        """Term ``i``'s share of ``group``'s assignment matrix, updated from the cache where it can be."""
        version, perms = self.version, self.perms
        stamp = tuple(version[g] for g in term.other_groups)
        hit = self.cache.get((group, i))
        if hit is not None and hit[0] == stamp:
            return hit[2]
        basis = tuple(perms[g] for g in term.other_groups)
        value = None
        if hit is not None and len(basis) == 1:
            old, new = hit[1][0], basis[0]
            moved = int((old != new).sum())
            if moved == 0:
                value = hit[2]
            elif moved <= DELTA_FRACTION * len(new):
                value = hit[2] + term.delta(old, new)
        if value is None:  # version 0 is the identity: skip gathering along those axes
            value = term.full({g: perms[g] for g in term.other_groups if version[g]})
        self.cache[(group, i)] = (stamp, basis, value)
        return value

    def reassign(self, group: str) -> bool:
        """Solve ``group``'s assignment given the others; whether it improved the objective."""
        stamp = tuple(self.version[g] for t in self.terms[group] for g in t.other_groups)
        if self.solved_at.get(group) == stamp:
            return False  # A is unchanged since the last assignment: the same permutation would come back
        n = self.spec.group_sizes[group]
        a = torch.zeros(n, n, dtype=torch.float32)
        for i, term in enumerate(self.terms[group]):
            a += self.contribution(group, i, term)
        a64 = a.double()
        _check_finite(group, a64, self.terms[group])
        new, self.duals[group] = max_assignment(a64, self.duals.get(group))
        rows = torch.arange(n)
        gain = float(a64[rows, new].sum() - a64[rows, self.perms[group]].sum())
        self.solved_at[group] = stamp
        if torch.equal(new, self.perms[group]):
            return False
        self.perms[group] = new
        self.version[group] += 1
        return gain > IMPROVEMENT_TOL


def weight_matching(
    spec: PermutationSpec,
    ref_sd: Mapping[str, torch.Tensor],
    sd: Mapping[str, torch.Tensor],
    max_sweeps: int = 100,
    seed: int = 0,
) -> Perms:
    """Permutations of ``sd``'s hidden units minimizing its L2 distance to ``ref_sd``."""
    return match_weights(spec, ref_sd, sd, max_sweeps, seed).perms


Checkpoints = Sequence[Mapping[str, torch.Tensor]] | Mapping[str, torch.Tensor]


def align_model(
    spec: PermutationSpec,
    ref_sd: Mapping[str, torch.Tensor],
    checkpoints: Checkpoints,
    max_sweeps: int = 100,
    seed: int = 0,
    anchor: Mapping[str, torch.Tensor] | None = None,
) -> tuple[list[dict[str, torch.Tensor]] | dict[str, torch.Tensor], Perms]:
    """Align all checkpoints of one model with the permutation found on its last checkpoint
    (or on ``anchor``, another checkpoint of the model, so that a subset of its epochs is
    aligned exactly as the whole sequence is).

    ``checkpoints`` is a list of state dicts (epochs in order) or one stacked state dict
    (leading epoch dim); the aligned checkpoints come back in the same form.
    """
    if isinstance(checkpoints, Mapping):
        if len(leading_dims(checkpoints, spec, "stacked checkpoints")) != 1:
            raise SpecMismatchError(f"{spec.name}: stacked checkpoints need a leading epoch dim")
        stacked = checkpoints
        last = {k: v[-1] for k, v in stacked.items()}
    else:
        if not checkpoints:
            raise ValueError("align_model got no checkpoints")
        stacked = stack_state_dicts(checkpoints)
        last = checkpoints[-1]
    perms = weight_matching(spec, ref_sd, last if anchor is None else anchor, max_sweeps, seed)
    aligned = apply_permutation(stacked, spec, perms)
    return (aligned if isinstance(checkpoints, Mapping) else unstack_state_dict(aligned)), perms


def reference_matching(
    spec: PermutationSpec,
    ref_sd: Mapping[str, torch.Tensor],
    sd: Mapping[str, torch.Tensor],
    max_sweeps: int = 100,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> tuple[Perms, int]:
    """The plain weight-matching loop: every A rebuilt from the original tensors.

    Same group order and stopping rule as :func:`match_weights`, none of its caching; the
    oracle the tests hold the fast path to and the baseline ``bench/bench_align.py`` times.
    Returns the permutations and the number of sweeps.
    """
    perms = identity_permutation(spec)
    groups = list(spec.group_sizes)
    gen = torch.Generator().manual_seed(seed)
    for sweep in range(1, max_sweeps + 1):
        progress = False
        for gi in torch.randperm(len(groups), generator=gen).tolist():
            group, n = groups[gi], spec.group_sizes[groups[gi]]
            a = torch.zeros(n, n, dtype=dtype)
            for key, axis, unit_axis in spec.members[group]:
                w = sd[key].to(dtype)
                for d, pa in enumerate(spec.axes[key]):
                    if pa is not None and d != axis:
                        w = w.index_select(d, pa.index(perms[pa.group], spec.group_sizes[pa.group]))
                r = units_first(ref_sd[key].to(dtype), axis, unit_axis)
                a += r.reshape(n, -1) @ units_first(w, axis, unit_axis).reshape(n, -1).T
            new = torch.from_numpy(linear_sum_assignment(a.numpy(), maximize=True)[1]).long()
            rows = torch.arange(n)
            progress |= bool(a[rows, new].double().sum() > a[rows, perms[group]].double().sum() + IMPROVEMENT_TOL)
            perms[group] = new
        if not progress:
            return perms, sweep
    return perms, max_sweeps
