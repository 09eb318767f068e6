"""The set-up-aware rule's search over candidates (CWMP's default rule, ``Pruner(rule="setup")``).

A mixin of ``cwmp.pruner.Pruner``: the envelope prefix (each layer's scores clipped at its open
item's ratio, ``cwmp.setup_rule``), Top-K's own mask when it fits, the repairs of the layer the
prefix broke at when the fractional bound says they may matter, and a short local search over the
open layers; the candidate that retains the most ``sum |u|**power`` wins. The selections
themselves (``_within``, ``_on``, ``_priced``, ``_price``) are the pruner's. docs/cwmp.md states the
rule, its guarantee and why.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from cwmp.candidates import Candidates, candidate_openings
from cwmp.masks import Layers, layers_budget_mask, layers_topk_mask
from cwmp.pools import _LayeredPool
from cwmp.selection import RETAINED_TOLERANCE, retained
from cwmp.setup_rule import Opening, openings

if TYPE_CHECKING:
    from cwmp.pruner import _Priced

__all__ = ["SetupSearch"]


class SetupSearch:
    """The set-up-aware rule's methods, mixed into ``Pruner`` (which supplies ``power``, ``fill``,
    ``cost_map``, ``CERTIFIED``, ``REPAIRS`` and the selections)."""

    def _setup_rule(self, tensors: Layers, marginal, fixed, budget_j: float, named,
                    top: "_Priced | None", cand: Candidates | None = None) -> tuple["_Priced", str]:
        """The set-up-aware rule (see the module's docstring): the envelope prefix, the repairs of
        the layer it broke at, the break layer alone when the guarantee needs it, and Top-K's own
        mask when it fits; the one that retains the most ``sum |u|**power`` (the first on ties).
        ``cand``: the gathered entries (``cwmp.candidates``), where the first selections are tried."""
        opens = None if cand is None else candidate_openings(cand, marginal, fixed, budget_j, self.power)
        if opens is None:
            opens = openings(tensors, marginal, fixed, budget_j, self.power)
        caps = [o.cap for o in opens]

        def prefix(rank: bool, clip) -> _Priced:
            def select(layers, witness):
                return layers_budget_mask(layers, marginal, fixed, budget_j, self.power, rank_by_cost=rank, caps=clip,
                                          witness=witness)
            chosen = self._on(cand, named, select, _LayeredPool, marginal if rank else None, self.power, clip)
            if chosen is None or chosen.joules > budget_j:
                chosen = self._within(tensors, marginal, fixed, budget_j, named, caps=clip, rank_by_cost=rank)
            return chosen

        envelope = self._largest(tensors, prefix(True, caps), opens, budget_j, named)
        if top is None:  # a budget in joules: Top-K's order at this energy
            top = prefix(False, None)
        fits = top.joules <= budget_j
        values = self._retained(tensors, [envelope, top] if fits else [envelope])
        candidates = [("envelope", envelope, values[0])] + ([("topk", top, values[1])] if fits else [])
        b = _break_layer(opens, envelope.counts)
        bound = self._bound(tensors, envelope, values[0] * (1 + RETAINED_TOLERANCE), opens, b, budget_j, named)
        if max(c[2] for c in candidates) * (1 - RETAINED_TOLERANCE) < (1 - self.CERTIFIED) * bound:
            everything = set(range(len(opens)))
            open_ = {i for i, k in enumerate(envelope.counts) if k}
            tried: list[set[int]] = [open_]
            if not self.fill:  # the greedy walk on: the entries after the break that still fit
                filled = self._largest(tensors, self._within(tensors, marginal, fixed, budget_j, named, caps=caps,
                                                             fill=True), opens, budget_j, named)
                candidates.append(("envelope + fill", filled, self._retained(tensors, [filled])[0]))
            if b is not None:
                for label, keep in (("open set", open_ | {b}), ("open set - 1", open_ - {b})):
                    if keep and keep not in tried[1:]:
                        tried.append(keep)
                        trial = self._within(tensors, marginal, fixed, budget_j, named, closed=everything - keep,
                                         fill=True)
                        candidates.append((label, trial, self._retained(tensors, [trial])[0]))
                # the half-approximation needs the layer alone (fast sums: with their margin)
                if max(c[2] for c in candidates) * (1 - RETAINED_TOLERANCE) < bound / 2:
                    alone = self._within(tensors, marginal, fixed, budget_j, named, closed=everything - {b},
                                         fill=True)
                    candidates.append(("single layer", alone, self._retained(tensors, [alone])[0]))
            candidates.append(self._local_search(tensors, marginal, fixed, budget_j, named, opens,
                                                 max(candidates, key=lambda c: c[2]), bound, tried))
        return self._best(tensors, candidates)

    def _best(self, tensors: Layers, candidates: list[tuple]) -> tuple["_Priced", str]:
        """The candidate that retains the most (the first of equals): by the fast sums, and by
        exact float64 sums among those the fast sums cannot tell apart."""
        best = max(c[2] for c in candidates)
        close = [c for c in candidates if c[2] >= best * (1 - 2 * RETAINED_TOLERANCE)]
        if len(close) > 1:
            exact = self._retained(tensors, close, exact=True)
            close = [(label, chosen, value) for (label, chosen, _), value in zip(close, exact)]
        label, chosen, _ = max(close, key=lambda c: c[2])  # max keeps the first of equals
        return chosen, label

    def _local_search(self, tensors: Layers, marginal, fixed, budget_j: float, named, opens: list[Opening],
                      best: tuple, bound: float, tried: list[set[int]]) -> tuple:
        """Improve the best candidate's open set by closing one of its layers with a set-up (the
        least value per joule first), opening one it left closed (of the two of largest ratio), or
        swapping one for the other, a selection each, keeping a move only if it retains more; at
        most ``REPAIRS`` selections, and none once the best is within ``CERTIFIED`` of the bound."""
        everything = set(range(len(opens)))
        label, chosen, value = best
        tries = 0
        improved = True
        while improved and tries < self.REPAIRS and value < (1 - self.CERTIFIED) * bound:
            improved = False
            values = self._values(tensors, chosen)
            names = list(named)
            open_ = {i for i, k in enumerate(chosen.counts) if k}
            closing = sorted((i for i in open_ if fixed[i] > 0),
                             key=lambda i: values[i] / max(chosen.by_layer[names[i]], 1e-300))
            opening = sorted((i for i in everything - open_ if opens[i].affordable),
                             key=lambda i: (-opens[i].ratio, i))
            moves = [open_ - {i} for i in closing] + [open_ | {i} for i in opening[:2]]
            moves += [(open_ | {i}) - {j} for i in opening[:2] for j in closing]  # swaps
            for keep in moves:
                if not keep or keep in tried:
                    continue
                if tries >= self.REPAIRS:
                    break
                tries += 1
                tried.append(keep)
                trial = self._within(tensors, marginal, fixed, budget_j, named, closed=everything - keep,
                                     fill=True)
                trial_value = self._retained(tensors, [trial])[0]
                if trial_value > value:
                    label, chosen, value = "local search", trial, trial_value
                    improved = True
                    break
        return label, chosen, value

    def _largest(self, tensors: Layers, chosen: "_Priced", opens: list[Opening], budget_j: float,
                 named) -> "_Priced":
        """Within a layer the clipped scores tie at its cap, and ties go by position: where the
        prefix kept only part of a layer's tied entries, keep that many of its largest instead
        (same count, same joules by the linear accounting; kept only if the cost map agrees)."""
        partial = [i for i, (o, k) in enumerate(zip(opens, chosen.counts)) if 0 < k < o.at_cap]
        if not partial:
            return chosen
        if chosen.sub is not None:  # within the gathered entries: each holds its layer's largest
            cand = chosen.candidates
            sub, start = chosen.sub.clone(), cand.sub_starts
            for i in partial:
                sub[start[i] : start[i + 1]] = layers_topk_mask([cand.sub.flats[i]], chosen.counts[i])
            fixed = self._priced(cand, sub, named)
            return fixed if fixed.joules <= budget_j else chosen
        mask = chosen.mask.clone()
        start = [0]
        for flat in tensors.flats:
            start.append(start[-1] + flat.numel())
        for i in partial:
            mask[start[i] : start[i + 1]] = layers_topk_mask([tensors.flats[i]], chosen.counts[i])
        fixed = self._price(mask, named, [f.numel() for f in tensors.flats])
        return fixed if fixed.joules <= budget_j else chosen

    def _retained(self, tensors: Layers, chosen: list, exact: bool = False) -> list[float]:
        """The retained ``sum |u|**power`` of each selection (or candidate), in one pass over the
        update; fast sums (within ``RETAINED_TOLERANCE``) unless ``exact``."""
        chosen = [c[1] if isinstance(c, tuple) else c for c in chosen]
        cand = chosen[0].candidates if chosen else None
        if cand is not None and all(c.sub is not None and c.candidates is cand for c in chosen):
            return retained(_LayeredPool(cand.sub, None, self.power), [c.sub for c in chosen], exact=exact)
        return retained(_LayeredPool(tensors, None, self.power), [c.mask for c in chosen], exact=exact)

    def _bound(self, tensors: Layers, envelope: "_Priced", value: float, opens: list[Opening], b: int | None,
               budget_j: float, named) -> float:
        """An upper bound on the optimum (linear accounting): the fractional knapsack over the layers'
        envelopes. It takes what the envelope prefix took before the item it broke at, then spends
        the rest of the budget at that item's value per joule at most: the break layer's r* when
        the prefix broke inside an open item (without what it kept of that layer), else the value
        per joule of one entry, which is also at most the largest ``|u|**power`` of any layer."""
        left = max(0.0, budget_j - envelope.joules)
        if b is None:
            per_joule = max((min(o.cap, o.ratio) for o in opens if o.affordable), default=0.0)
            top = max((m**self.power for m in tensors.max_magnitudes), default=0.0)
            return value + min(left * per_joule, top)
        name = list(named)[b]
        kept_b = self._values(tensors, envelope, only=b)[b] if envelope.counts[b] else 0.0
        return value - kept_b + (left + envelope.by_layer[name]) * opens[b].ratio

    def _values(self, tensors: Layers, chosen: "_Priced", only: int | None = None) -> list[float]:
        """Per layer, the retained ``sum |u|**power`` of the kept entries (float64); with ``only``,
        of that layer alone (the others 0)."""
        out, start = [], 0
        flats, mask = (tensors.flats, chosen.mask) if chosen.sub is None else (chosen.candidates.sub.flats, chosen.sub)
        for i, (flat, k) in enumerate(zip(flats, chosen.counts)):
            part = mask[start : start + flat.numel()]
            start += flat.numel()
            if not k or (only is not None and i != only):
                out.append(0.0)
                continue
            kept = flat[part].to(torch.float64).abs_()
            out.append(float(kept.pow_(self.power).sum()) if self.power != 1 else float(kept.sum()))
        return out


def _break_layer(opens: list[Opening], counts: list[int]) -> int | None:
    """The layer of the first entry the envelope prefix did not keep, when that entry is part of
    an open item: among the layers whose open item the prefix kept only part of, the one of largest
    cap, the first of equals (the prefix's order puts it first). None when every open item that
    can be paid for is whole (the prefix then stopped at a single entry)."""
    incomplete = [i for i, o in enumerate(opens) if o.affordable and counts[i] < o.count]
    if not incomplete:
        return None
    return max(incomplete, key=lambda i: (opens[i].cap, -i))
