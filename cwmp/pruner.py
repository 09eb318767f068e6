"""The pruner: one budget across all tensors of an update, CWMP or Top-K chosen by name.

The budget is global because the point of CWMP is to move entries between layers: a joule spent on
an expensive layer's entry buys less than one spent on a cheap layer's. The masks are chosen as if
over the concatenation of all tensors (ties by position in it), each entry ranked by its layer's
marginal cost, and a layer with any kept entry also pays its fixed cost once. The concatenation is
never made: the selection walks the tensors as they are (``cwmp.masks.layers_budget_mask``). Every
result states its predicted energy, computed by the cost map (``CostMap.joules_by_layer``), never
above the budget, and whether those costs came from a simulated profile.

Methods (``METHODS``):

- ``cwmp``: largest ``|u|**power / c`` first until the budget is spent (``cwmp_mask``);
- ``topk``: largest ``|u|`` first, cost-blind. With a keep-ratio budget it is exactly Top-K (the
  k = round(r N) largest entries over all tensors); with a budget in joules it keeps the longest
  magnitude-ordered prefix that the budget pays for.

A budget is joules per step, or ``Budget.topk_keep_ratio(r)``: the joules that Top-K at keep ratio
r spends on this very update (fixed costs of the layers it touches included), so that both methods
can be compared at equal energy. Top-K's mask is found by the same sort-free selection.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from cwmp.candidates import Candidates, estimate, expand, gather_from
from cwmp.costmap import CostMap, NamedTensors, named_tensors
from cwmp.errors import BudgetError, MaskInputError
from cwmp.feedback import ErrorFeedback
from cwmp.masks import Layers, check_layers, layer_counts, layers_budget_mask, layers_topk_mask, single_threaded
from cwmp.parallel import map_largest_first
from cwmp.pools import _LayeredPool, check_layers_beside
from cwmp.setup_search import SetupSearch
from cwmp.sparse import SparseUpdate

__all__ = ["METHODS", "RULES", "Budget", "LazyMasks", "PruneResult", "Pruner"]

METHODS = ("cwmp", "topk")
#: CWMP's selection rules: ``setup`` (the default) decides per layer whether its set-up is worth
#: paying; ``prefix`` is the plain longest score-ordered prefix (every layer it touches pays)
RULES = ("setup", "prefix")


@dataclass(frozen=True)
class Budget:
    """Joules per round (the whole round: what every round pays whatever the mask keeps, the cost
    map's ``floor_j``, plus the mask's part), given directly or as what Top-K spends at a keep
    ratio (the floor plus Top-K's mask)."""

    joules: Optional[float] = None
    keep_ratio: Optional[float] = None

    def __post_init__(self) -> None:
        if (self.joules is None) == (self.keep_ratio is None):
            raise MaskInputError(
                "a Budget is either Budget.of_joules(j) or Budget.topk_keep_ratio(r), not both or neither"
            )
        if self.joules is not None and not (self.joules >= 0):
            raise MaskInputError(f"a budget in joules must be >= 0, got {self.joules!r}")
        if self.keep_ratio is not None and not (0 <= self.keep_ratio <= 1):
            raise MaskInputError(f"a keep ratio must be in [0, 1], got {self.keep_ratio!r}")

    @classmethod
    def of_joules(cls, joules: float) -> "Budget":
        return cls(joules=float(joules))

    @classmethod
    def topk_keep_ratio(cls, ratio: float) -> "Budget":
        return cls(keep_ratio=float(ratio))

    def __str__(self) -> str:
        if self.joules is not None:
            return f"{self.joules:.6g} J"
        return f"Top-K energy at keep ratio {self.keep_ratio:g}"


@dataclass(frozen=True)
class PruneResult:
    """Masks of one round, with what they are predicted to cost.

    - ``budget_j``: the whole round's budget (for a keep-ratio budget: the floor plus Top-K's mask);
    - ``predicted_j``: the whole round, ``floor_j + mask_j``, never above ``budget_j``;
    - ``mask_j``: the part the masks decide (set-ups, kept entries, lines, density), the sum of
      ``joules_by_layer``;
    - ``floor_j``: what the round pays whatever the masks keep (``CostMap.floor_j`` of these tensors);
    - ``candidate``: which candidate the set-up-aware rule kept (``envelope``, ``open set``,
      ``open set - 1``, ``single layer``, ``topk``), or the method's name for the other rules.
    """

    method: str
    masks: Mapping[str, Tensor]  # a dict, or from ``compress(sparse=True)`` made when first read
    budget_j: float
    predicted_j: float
    joules_by_layer: dict[str, float]
    kept: int
    total: int
    simulated: bool  # the costs came from a simulated profile
    mask_j: float = 0.0
    floor_j: float = 0.0
    candidate: str = ""

    @property
    def keep_ratio(self) -> float:
        return self.kept / self.total if self.total else 0.0

    def summary(self) -> str:
        label = "  [SIMULATED costs]" if self.simulated else ""
        return (
            f"{self.method}: kept {self.kept}/{self.total} ({self.keep_ratio:.3%}), predicted "
            f"{self.predicted_j:.6g} J (mask {self.mask_j:.6g} J + floor {self.floor_j:.6g} J) "
            f"of a {self.budget_j:.6g} J budget{label}"
        )


class LazyMasks(Mapping):
    """``PruneResult.masks`` of ``Pruner.compress(sparse=True)`` when the masks were chosen on the
    gathered entries: what is sent holds the kept positions, and a client that only sends them
    never needs a mask of the update's size. The masks (views of one flat mask, as otherwise) are
    made when one is first read, from the gathered positions and the chosen selection's flags
    (held until then: 5 bytes per gathered entry), then kept. Reading is safe from several threads;
    a pickled ``LazyMasks`` is its masks, a plain dict."""

    def __init__(self, names: list[str], make: Callable[[], dict[str, Tensor]]) -> None:
        self._names = names
        self._make: Callable[[], dict[str, Tensor]] | None = make
        self._masks: dict[str, Tensor] | None = None
        self._lock = threading.Lock()

    @property
    def made(self) -> bool:
        return self._masks is not None

    def _all(self) -> dict[str, Tensor]:
        if self._masks is None:
            with self._lock:
                if self._masks is None:
                    self._masks = self._make()
                    self._make = None  # the positions and flags it holds go with it
        return self._masks

    def __getitem__(self, name: str) -> Tensor:
        return self._all()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __reduce__(self):
        return dict, (dict(self._all()),)

    def __repr__(self) -> str:
        return f"LazyMasks({self._names!r}, made={self.made})"


@dataclass
class _Priced:
    """A flat mask over the concatenation, its kept entries per layer and its joules by layer;
    ``sub``: the same mask over ``candidates``' gathered entries, when it was selected there (then
    the flat mask is made when it is first asked for: most candidates are compared and dropped)."""

    flat: Tensor | None
    by_layer: dict[str, float]
    counts: list[int]
    sub: Tensor | None = None
    candidates: Candidates | None = None
    kept_positions: list | None = field(default=None, repr=False)  # positions(), once found

    @property
    def mask(self) -> Tensor:
        if self.flat is None:
            self.flat = self.candidates.expand(self.positions())
        return self.flat

    def positions(self) -> list | None:
        """Per layer, the kept positions (numpy, ascending), when selected on the gathered entries."""
        if self.sub is None:
            return None
        if self.kept_positions is None:
            self.kept_positions = self.candidates.positions(self.sub)
        return self.kept_positions

    @property
    def joules(self) -> float:
        return math.fsum(self.by_layer.values())


class Pruner(SetupSearch):
    """Masks for named updates under an energy budget; ``method`` is ``'cwmp'`` or ``'topk'``.

    ``rule`` (CWMP only) is ``'setup'`` (the default: the set-up-aware rule, see the module's
    docstring) or ``'prefix'`` (the plain longest score-ordered prefix, every touched layer paying
    its set-up)."""

    #: selection budgets tried when the cost map's exact energy of a mask exceeds the budget (a
    #: cost map whose layer cost is not linear in k), before bisecting towards the empty mask
    RESCALES = 4
    BISECTIONS = 24
    #: a non-linear cost map may price a selection below its linear estimate; when more than this
    #: share of the budget is left, larger selection budgets are tried (GROWTHS bisection steps)
    UNDERSPENT = 0.005
    GROWTHS = 8
    #: the set-up rule repairs its envelope prefix only when the best candidate may be more than
    #: this share below the optimum (by the fractional bound); then with at most REPAIRS selections
    #: of local search over the open layers
    CERTIFIED = 0.005
    REPAIRS = 8

    def __init__(
        self, cost_map: CostMap, budget: Budget, method: str = "cwmp", power: float = 1.0, fill: bool = False,
        skip_layers: int = 0, rule: str = "setup",
    ) -> None:
        if method not in METHODS:
            raise MaskInputError(f"unknown pruning method {method!r}; choose one of {', '.join(METHODS)}")
        if rule not in RULES:
            raise MaskInputError(f"unknown selection rule {rule!r}; choose one of {', '.join(RULES)}")
        if isinstance(skip_layers, bool) or not isinstance(skip_layers, int) or skip_layers < 0:
            raise MaskInputError(
                f"skip_layers must be an int >= 0 (how many layers to try closing; 0: the greedy rule alone), "
                f"got {skip_layers!r}"
            )
        self.skip_layers, self.rule = skip_layers, rule
        if not isinstance(budget, Budget):
            raise MaskInputError(
                f"budget must be a Budget (Budget.of_joules or Budget.topk_keep_ratio), got {budget!r}"
            )
        self.cost_map, self.budget, self.method, self.power, self.fill = cost_map, budget, method, power, fill

    def masks(self, updates: NamedTensors) -> PruneResult:
        named = named_tensors(updates)
        with single_threaded(_device_of(list(named.values()))):
            return self._masks(named)

    def _masks(self, named: dict[str, Tensor], feedback: ErrorFeedback | None = None) -> PruneResult:
        return self._choose(named, feedback)[0]

    def _choose(self, named: dict[str, Tensor], feedback: ErrorFeedback | None = None,
                lazy: bool = False) -> tuple[PruneResult, list | None]:
        """The result, and per tensor the kept positions when the chosen selection has them (they
        spare error feedback a pass over the masks); the gathered entries are freed on return.
        ``lazy``: with those positions, the result's masks are made when first read
        (``LazyMasks``, which holds the gathered positions and the selection's flags till then)."""
        names = list(named)
        marginal = [self.cost_map.marginal_j(name) for name in names]  # a missing layer fails here, by name
        fixed = [self.cost_map.fixed_j(name) for name in names]
        floor_j = self.cost_map.floor_j(names)
        known = None if feedback is None else [feedback.extremes_of(named[name]) for name in names]
        top = cand = None
        setup = self.method == "cwmp" and self.rule == "setup"
        fast = setup and self.cost_map.linear and not self.fill  # one gathering pass serves the rule
        early: tuple = ()  # (the gathering pass's floors,) when estimated while the checks reduce the tensors
        if fast and known is None:
            def ahead(layers: Layers) -> tuple:
                try:
                    if self.budget.keep_ratio is not None:
                        k = _k_of(self.budget.keep_ratio, sum(f.numel() for f in layers.flats))
                        return (estimate(layers, marginal, fixed, self.power, k=k),)
                    budget_j = _mask_budget(self.budget.joules, floor_j)
                    return (estimate(layers, marginal, fixed, self.power, budget_j=budget_j),)
                except Exception:  # a head start only: the steps below meet the problem again and say it
                    return ()

            tensors, early = check_layers_beside([named[name] for name in names], ahead)
        else:
            tensors = check_layers([named[name] for name in names], known)  # once, for every selection
        sizes = [t.numel() for t in tensors.flats]
        total = sum(sizes)

        def candidates(**budget) -> Candidates | None:
            if not fast:
                return None
            floors = early[0] if early else estimate(tensors, marginal, fixed, self.power, **budget)
            return None if floors is None else gather_from(tensors, floors)

        if self.budget.keep_ratio is not None:
            k = _k_of(self.budget.keep_ratio, total)
            cand = candidates(k=k)
            top = self._on(cand, named, lambda layers, witness: layers_topk_mask(layers, k, witness)
                           if k <= sum(cand.sub_sizes) else None, _LayeredPool, None, 1.0)
            if top is None:
                top = self._price(layers_topk_mask(tensors, k), named, sizes)
            mask_budget_j = top.joules
            budget_j = floor_j + mask_budget_j
        else:
            budget_j = self.budget.joules
            mask_budget_j = _mask_budget(budget_j, floor_j)
            cand = candidates(budget_j=mask_budget_j)
        if self.method == "topk" and top is not None:
            chosen, candidate = top, "topk"
        else:
            chosen = None
            candidate = self.method
            if not setup or not self.cost_map.linear:
                chosen = self._within(tensors, marginal, fixed, mask_budget_j, named)
            if not self.cost_map.linear:
                # a layer's cost per entry depends on how many of its entries are kept (shared cache
                # lines, the density term): select again, priced at the densities just selected (the
                # set-up rule selects with these prices itself)
                marginal = [self.cost_map.marginal_j(name, max(k, 1) / n)
                            for name, k, n in zip(names, chosen.counts, sizes)]
                if not setup:
                    chosen = self._within(tensors, marginal, fixed, mask_budget_j, named)
            if setup:
                chosen, candidate = self._setup_rule(tensors, marginal, fixed, mask_budget_j, named, top, cand)
            if self.skip_layers and self.method == "cwmp":
                chosen = self._skip(tensors, marginal, fixed, mask_budget_j, named, chosen)
        mask_j = chosen.joules
        positions = chosen.positions()
        if lazy and positions is not None and chosen.flat is None:
            cand, sub = chosen.candidates, chosen.sub
            # the positions are found again from the gathered positions and the selection's flags
            # (what is sent shares the positions' memory, and its receiver may change it)
            recipe = (cand.index, sub.numpy(), cand.sub_starts, cand.starts)
            shapes = {name: t.shape for name, t in named.items()}
            masks: Mapping[str, Tensor] = LazyMasks(names, lambda: _views(_expand_kept(*recipe), shapes))
        else:
            masks = _views(chosen.mask, named)
        return PruneResult(
            method=self.method,
            masks=masks,
            budget_j=budget_j,
            predicted_j=floor_j + mask_j,
            joules_by_layer=chosen.by_layer,
            kept=sum(chosen.counts),
            total=total,
            simulated=self.cost_map.simulated,
            mask_j=mask_j,
            floor_j=floor_j,
            candidate=candidate,
        ), positions

    def _skip(self, tensors: Layers, marginal, fixed, budget_j: float, named, chosen: "_Priced") -> "_Priced":
        """The layer-skipping rule: try closing layers, one at a time, at most ``skip_layers``
        tries: first the untouched layer whose fixed cost stopped the prefix, if one did (its first
        entry does not fit in what is left while another entry would; the best-ranked such layer),
        then the open layers that return least for their joules (retained
        ``sum |u|**power`` over the layer's predicted joules). Each try selects again at the same
        budget without the closed layers, and is kept only if it retains strictly more
        ``sum |u|**power``. Every candidate is a full selection within the budget and the rule's
        result is the first, so the result is never worse than the rule's at equal budget (and
        never over it)."""
        names = list(named)
        values = self._values(tensors, chosen)
        top = [m**self.power / c for m, c in zip(tensors.max_magnitudes, marginal)]  # each layer's best score
        closed: set[int] = set()
        tries = 0
        while tries < self.skip_layers:
            open_ = [i for i, k in enumerate(chosen.counts) if k and i not in closed]
            order = sorted(open_, key=lambda i: values[i] / max(chosen.by_layer[names[i]], 1e-300))
            # the prefix stopped at an untouched layer's best entry when that layer's first entry
            # (its fixed cost included) does not fit in what is left, while some other entry would:
            # closing it lets the prefix go on. Then the best-ranked such layer is tried first.
            left = budget_j - chosen.joules
            untouched = [i for i, k in enumerate(chosen.counts) if not k and i not in closed and tensors.flats[i].numel()]
            blocked = [i for i in untouched if fixed[i] + marginal[i] > left]
            room = any(marginal[i] <= left for i in open_ if chosen.counts[i] < tensors.flats[i].numel()) or any(
                fixed[i] + marginal[i] <= left for i in untouched)
            if blocked and room:
                order.insert(0, max(blocked, key=lambda i: (top[i], -i)))
            for layer in order[: self.skip_layers - tries]:
                tries += 1
                trial = self._within(tensors, marginal, fixed, budget_j, named, closed=closed | {layer})
                trial_values = self._values(tensors, trial)
                if math.fsum(trial_values) > math.fsum(values):
                    chosen, values = trial, trial_values
                    closed.add(layer)
                    break
            else:
                break  # no candidate helped: stop
        return chosen

    def _price(self, mask: Tensor, named: dict[str, Tensor], sizes: list[int]) -> "_Priced":
        """The mask with its per-layer counts (one pass over it) and the cost map's joules."""
        counts = layer_counts(mask, sizes)
        return _Priced(mask, self.cost_map.joules_by_layer(_views(mask, named), counts), counts)

    def _priced(self, cand: Candidates, sub: Tensor, named: dict[str, Tensor]) -> "_Priced":
        """A mask over the gathered entries, made whole and priced (a linear cost map: from counts)."""
        counts = cand.counts(sub)
        kept = {name: (k, t.numel()) for (name, t), k in zip(named.items(), counts)}
        return _Priced(None, self.cost_map.joules_of_counts(kept), counts, sub, cand)

    def _on(self, cand: Candidates | None, named, select, pool, divisors, power, caps=None) -> "_Priced | None":
        """``select(layers, witness)`` run on the gathered entries, when there are any and its
        prefix is shown to be the one over the whole update (``Candidates.exact_prefix`` with the
        selection's keys, ``pool(cand.sub, divisors, power, caps)``, and its witness); else None."""
        witness: list = []
        sub = None if cand is None else select(cand.sub, witness)
        if sub is None or not cand.exact_prefix(pool(cand.sub, divisors, power, caps), sub, witness):
            return None
        return self._priced(cand, sub, named)

    def _select(self, tensors: Layers, marginal, fixed, budget_j: float, named, caps=None,
                closed: frozenset | set = frozenset(), rank_by_cost: bool | None = None,
                fill: bool | None = None) -> "_Priced":
        """One selection with the linear accounting, priced by the cost map. ``closed`` layers keep
        nothing (the selection runs over the others); ``caps`` clip the scores (the set-up rule)."""
        rank = self.method == "cwmp" if rank_by_cost is None else rank_by_cost
        fill = self.fill if fill is None else fill
        sizes = [t.numel() for t in tensors.flats]
        if not closed:
            mask = layers_budget_mask(tensors, marginal, fixed, budget_j, self.power, rank_by_cost=rank,
                                      fill=fill, caps=caps)
            return self._price(mask, named, sizes)
        keep = [i for i in range(len(sizes)) if i not in closed]
        sub = Layers([tensors.flats[i] for i in keep], [tensors.max_magnitudes[i] for i in keep],
                     tensors.score_dtype, tensors.device,
                     nonnegative=tensors.nonnegative)
        part = layers_budget_mask(sub, [marginal[i] for i in keep], [fixed[i] for i in keep], budget_j, self.power,
                                  rank_by_cost=rank, fill=fill,
                                  caps=None if caps is None else [caps[i] for i in keep])
        mask = torch.zeros(sum(sizes), dtype=torch.bool, device=tensors.device)
        starts = [0]
        for size in sizes:
            starts.append(starts[-1] + size)
        at = 0
        for i in keep:
            mask[starts[i] : starts[i + 1]] = part[at : at + sizes[i]]
            at += sizes[i]
        return self._price(mask, named, sizes)

    def _within(self, tensors, marginal, fixed, budget_j: float, named, **how) -> "_Priced":
        """Select with the linear accounting (fixed + marginal x k), then price the mask with the
        cost map. If the cost map says it is over the budget (its layer cost is not linear), select
        again with a smaller budget, a few times, then bisect between the empty mask (which costs
        nothing) and the last budget that was too much; return the best mask that fits. ``how``:
        ``_select``'s options."""
        selection_j = budget_j
        for attempt in range(self.RESCALES):
            chosen = self._select(tensors, marginal, fixed, selection_j, named, **how)
            spent_j = chosen.joules
            if spent_j <= budget_j:
                if attempt == 0 and not self.cost_map.linear and 0 < spent_j < budget_j * (1 - self.UNDERSPENT):
                    return self._grow(tensors, marginal, fixed, budget_j, named, selection_j, chosen, how)
                return chosen
            selection_j = min(selection_j * (budget_j / spent_j), math.nextafter(selection_j, 0.0))
        sizes = [t.numel() for t in tensors.flats]
        best = self._price(torch.zeros(sum(sizes), dtype=torch.bool, device=tensors.device), named, sizes)
        if best.joules > budget_j:
            raise MaskInputError(
                f"the cost map prices keeping nothing at {best.joules} J, above the budget of {budget_j} J; "
                "a layer that keeps no entry must cost nothing (layer_joules)"
            )
        return self._bisect(tensors, marginal, fixed, budget_j, named, 0.0, selection_j, best, self.BISECTIONS, how)

    def _grow(self, tensors, marginal, fixed, budget_j: float, named, selection_j: float,
              chosen: "_Priced", how: dict) -> "_Priced":
        """Spend what the linear accounting left: bisect the selection budget upwards, keeping the
        largest selection the cost map prices within the budget."""
        high_j = selection_j * max(2.0, 1.5 * budget_j / max(chosen.joules, 1e-300))
        return self._bisect(tensors, marginal, fixed, budget_j, named, selection_j, high_j, chosen, self.GROWTHS, how)

    def _bisect(self, tensors, marginal, fixed, budget_j: float, named, low_j: float, high_j: float,
                best: "_Priced", steps: int, how: dict) -> "_Priced":
        """Search the selection budget between ``low_j`` (whose selection ``best`` fits) and ``high_j``
        for at most ``steps`` selections; return the largest selection the cost map prices within
        ``budget_j``. It stops once a selection spends at least ``1 - UNDERSPENT`` of the budget (as
        ``_within`` accepts a first selection). The next selection budget is interpolated between
        the bracket's ends (the price of a selection is nearly proportional to its selection
        budget): the secant through the last two tries, kept within 2 % and 98 % of the bracket; after
        two tries on the same side, a plain bisection step.
        A larger selection budget that keeps exactly what the smaller one kept sends the next try to
        the bracket's top; when that keeps the same too, the selection is saturated (selections grow
        with their budget) and the search stops."""
        target_j = budget_j * (1 - self.UNDERSPENT / 2)
        tried: list[tuple[float, float]] = [(low_j, best.joules)] if low_j > 0 else [(0.0, 0.0)]
        sides: list[bool] = []  # True: the try fitted
        saturated = False  # a larger selection budget kept nothing more: try the bracket's top
        for _ in range(steps):
            if best.joules >= budget_j * (1 - self.UNDERSPENT):
                break
            width = high_j - low_j
            if not width > 0:
                break  # the bracket closed (its top fitted)
            if saturated:
                middle_j = high_j
            elif len(sides) >= 2 and sides[-1] == sides[-2]:
                middle_j = low_j + width / 2  # two tries on one side: halve the bracket
            else:
                (x1, f1), (x2, f2) = (tried[-2], tried[-1]) if len(tried) >= 2 else ((0.0, 0.0), tried[-1])
                share = 0.5
                if f2 != f1:  # the secant through the last two tries
                    share = (x2 + (target_j - f2) * (x2 - x1) / (f2 - f1) - low_j) / width
                middle_j = low_j + width * min(0.98, max(0.02, share))
            chosen = self._select(tensors, marginal, fixed, middle_j, named, **how)
            tried.append((middle_j, chosen.joules))
            fits = chosen.joules <= budget_j
            sides.append(fits)
            if fits:
                if saturated and sum(chosen.counts) == sum(best.counts):
                    break  # the top of the bracket keeps what its bottom keeps: nothing more fits in
                saturated = sum(chosen.counts) == sum(best.counts) and chosen.joules == best.joules
                best, low_j = chosen, middle_j
            else:
                saturated = False
                high_j = middle_j
        return best

    def compress(
        self, updates: NamedTensors, feedback: ErrorFeedback | None = None, *, sparse: bool = False
    ) -> tuple[dict[str, Tensor] | dict[str, SparseUpdate], PruneResult]:
        """One client step: add the residuals, choose the masks, keep what they drop for next time.
        Returns the updates to send and the result: dense tensors (zeros where masked) by default,
        or with ``sparse=True`` one ``SparseUpdate`` per tensor, the kept positions and values,
        which is what a client puts on the wire.

        With feedback the step works in place: the update is added into the residual it holds,
        and what the masks drop stays there; the only new tensors are the ones sent and the masks
        (with ``sparse``, the kept entries only: no tensor of the update's size is made)."""
        named = named_tensors(updates)
        with single_threaded(_device_of(list(named.values()))):
            return self._compress(named, feedback, sparse)

    def _compress(self, named: dict[str, Tensor], feedback: ErrorFeedback | None, sparse: bool = False):
        if feedback is None:
            result = self.masks(named)
            if sparse:
                return {n: SparseUpdate.from_mask(u, result.masks[n]) for n, u in named.items()}, result
            return {n: torch.where(result.masks[n], u.detach(), 0) for n, u in named.items()}, result
        for name in named:
            self.cost_map.marginal_j(name)  # a layer the cost map lacks fails before any state changes
        _check_finite(named)
        corrected = feedback.compensate(named, in_place=True)
        try:
            result, positions = self._choose(named_tensors(corrected), feedback, lazy=sparse)
        except BaseException:
            feedback.undo(named)
            raise
        positions = dict(zip(corrected, positions)) if sparse and positions is not None else None
        return feedback.remember(corrected, result.masks, sparse=sparse, positions=positions), result


def _mask_budget(budget_j: float, floor_j: float) -> float:
    """What a whole-round budget leaves for the masks: ``budget_j - floor_j``, rounded down so that
    ``floor_j + mask_j <= budget_j`` holds in floats for every mask within it."""
    if not budget_j >= floor_j:
        raise BudgetError(
            f"the budget of {budget_j:.6g} J per round is below the {floor_j:.6g} J every round pays whatever "
            "the mask keeps (error feedback's compensation over every tensor, CostMap.floor_j); give a budget "
            f"of at least {floor_j:.6g} J"
        )
    mask_j = max(0.0, budget_j - floor_j)
    while mask_j > 0 and floor_j + mask_j > budget_j:
        mask_j = math.nextafter(mask_j, 0.0)
    return mask_j


def _k_of(ratio: float, n: int) -> int:
    return min(n, int(math.floor(ratio * n + 0.5)))


def _device_of(tensors: list[Tensor]) -> torch.device:
    return tensors[0].device if tensors else torch.device("cpu")


def _expand_kept(index: list, flags, sub_starts: list[int], starts: list[int]) -> Tensor:
    """The flat mask that the gathered positions ``index`` and the selection's ``flags`` keep."""
    return expand(Candidates.kept_positions(index, flags, sub_starts), starts)


def _views(mask: Tensor, like: Mapping[str, Tensor | torch.Size]) -> dict[str, Tensor]:
    """Per-tensor views of a flat mask over the concatenation (no copy), shaped as ``like``'s
    tensors (or shapes)."""
    shapes = {name: t if isinstance(t, torch.Size) else t.shape for name, t in like.items()}
    parts = torch.split(mask, [shape.numel() for shape in shapes.values()]) if shapes else ()
    return {name: part.view(shape) for (name, shape), part in zip(shapes.items(), parts)}


def _check_finite(named: dict[str, Tensor]) -> None:
    """NaN or inf in an update would poison the residual it is added into: refuse it first (one
    host round trip for all tensors)."""
    filled = [(n, t.detach()) for n, t in named.items() if t.numel() and t.is_floating_point()]
    if not filled:
        return
    if filled[0][1].device.type == "cpu":  # on the caller's threads
        flags = map_largest_first(lambda t: bool(_finite_hint(t)), [t for _, t in filled], [t.numel() for _, t in filled])
    else:
        flags = torch.stack([_finite_hint(t) for _, t in filled]).tolist()
    for (name, tensor), ok in zip(filled, flags):
        if not ok:
            bad = torch.nonzero(~torch.isfinite(tensor.reshape(-1))).squeeze(1)
            if not bad.numel():
                continue  # the sum overflowed: every entry is finite
            raise MaskInputError(
                f"update {name!r} has {bad.numel()} NaN or infinite entries (first at flat index {int(bad[0])}); "
                "a mask of such an update would be meaningless: fix the training step or clip the update"
            )


def _finite_hint(tensor: Tensor) -> Tensor:
    """True when every entry is finite; False when one may not be (then look closer). A float32 or
    float64 sum is NaN or inf if any entry is, and it is faster than a min and max; it can also
    overflow with every entry finite, hence only a hint."""
    if tensor.dtype in (torch.float32, torch.float64):
        return torch.isfinite(tensor.sum())
    return torch.isfinite(torch.stack(torch.aminmax(tensor))).all()
