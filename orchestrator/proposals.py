"""What the driver proposes besides the sampler's asks (issue 12): the uniform baselines,
the repair of over-budget asks, and local moves from the incumbent.

On a real pretrained model a budget search that lets the sampler roam loses to the
uniform policy of the same size: repairs stepped the largest layers down to 2 bits
(cheapest in bytes, dearest in metric), and the best uniform policy within the budget
was never tried. So, under a budget:

- the baselines are the best uniform policies *within* it: for every bits choice, the
  largest uniform keep that fits (1.0 where the bits fit as they are);
- a repair steps down the knob whose next lower choice loses the least estimated metric
  per unit of budget excess it removes, and then fills what slack is left the other way
  (the knob gaining the most per byte), so a repaired candidate sits at the budget's edge;
- half of the asks after the first candidates are local moves from the incumbent (the
  best policy within the budget so far: one knob raised, one knob jumped to any choice,
  or one or two knobs a step), repaired and filled the same way: the search spends them
  where the answer is. Once local moves stop paying (a run
  of them without a better incumbent) they thin out to one ask in four, then in eight,
  and the sampler gets the asks to explore (`LocalShare`).

The estimated loss of a knob's value is its metric drop in the sensitivity table (every
other layer float; made monotone), or without a table its kind's prior (search_spaces.kinds): quantization noise
(the step of a b-bit grid halves with every bit, so its noise power falls 4x: HAWQ's
perturbation view, Dong et al. 2019) and a steep price on pruning a pretrained model's
channels, which costs far more metric per byte than a bit does.
"""

from __future__ import annotations

import functools
import heapq
import math
import random
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from orchestrator.budget import Budget
from orchestrator.latency import LatencyModel
from search_spaces import Knob, SearchSpace
from search_spaces.cost import Cost, policy_cost
from search_spaces.kinds import ACT_BITS, BITS, KEEP, KnobKind, kind_of
from search_spaces.policy import Policy

Values = dict[str, Any]
UNIFORM_BASELINE_BITS = (32, 8, 4, 2)  # without a budget: the uniform float/8/4/2 policies
INT8 = 8  # with activation knobs, the uniform 8-bit baseline also runs W8A8
MOVE_TRIES = 32  # local moves drawn before giving the ask back to the sampler
# of the local moves that are not a raise, the share that set one knob to any other
# choice: steps of one grid point never cross to policies such as "this layer's FFN at
# 0.3, the bytes spent on bits elsewhere", which beat every stepwise move on MiniLM
JUMP_SHARE = 0.5
LOCAL_PATIENCE = 8  # local moves without a better incumbent before they thin out
LOCAL_SPARSEST = 8  # at least one ask in this many stays a local move


def nearest(knob: Knob, value: float) -> Any:
    """The knob's choice nearest `value` (ties to the smaller), so a rule that holds a
    layer at >= 4 bits gets 4 in a uniform 2-bit policy."""
    return min(knob.choices, key=lambda c: (abs(c - value), c))


def uniform_values(space: SearchSpace, bits: int, keep: float = 1.0) -> Values:
    """Every bits knob nearest `bits`, every keep knob nearest `keep`, other kinds at their
    reference."""
    target = {BITS.name: bits, KEEP.name: keep}
    return {k.name: nearest(k, target.get(k.kind, kind_of(k).reference)) for k in space.searchable}


@dataclass(frozen=True)
class Pricing:
    """Policies of one space priced against one budget (the cost model; no model built)."""

    space: SearchSpace
    budget: Budget
    latency: LatencyModel | None = None  # predicts latency for a latency limit

    def policy(self, values: Mapping[str, Any]) -> Policy:
        return Policy.from_values(self.space, {**self.space.fixed_values, **values})

    def cost(self, values: Mapping[str, Any]) -> Cost:
        return policy_cost(self.space, self.policy(values))

    def predicted_latency(self, policy: Policy) -> float | None:
        return self._latency(policy)[0]

    def _latency(self, policy: Policy) -> tuple[float | None, float | None]:
        """(predicted, timed) ms of `policy` under a latency limit (orchestrator/latency.py)."""
        if self.budget.latency_ms is None or self.latency is None:
            return None, None
        return self.latency.priced(policy)

    def violations(self, values: Mapping[str, Any]) -> dict[str, float]:
        """Per limit, the relative excess (the cost model's). Latency as predicted, raised
        by the predictor's typical error: repairs, fills and moves aim below the limit by
        that much, so most of what they propose measures within it (the ask itself calls a
        candidate over only beyond that error: proposer.py); as measured where a policy
        priced alike was (W8A8 timed before the search: the budget's W8A8 baseline at
        full width is taken when its time fits, not only when it fits with a margin)."""
        policy = self.policy(values)
        found = self.budget.violations(policy_cost(self.space, policy))
        predicted, timed = self._latency(policy)
        if predicted is not None:
            aimed = timed if timed is not None else predicted * (1 + self.latency.margin)
            found["latency"] = self.budget.latency_violation(aimed)
        return found

    def excess(self, values: Mapping[str, Any]) -> float:
        """Summed relative excess over the budget's limits (0 within it)."""
        return self.measure(values)[0]

    def load(self, values: Mapping[str, Any]) -> float:
        """The largest share of a limit used (1.0 at the budget's edge)."""
        return self.measure(values)[1]

    def measure(self, values: Mapping[str, Any]) -> tuple[float, float]:
        """(excess, load) of one pricing."""
        violations = self.violations(values).values()
        return (sum(max(0.0, v) for v in violations),
                max((v + 1.0 for v in violations), default=0.0))  # fmt: skip


def baselines(pricing: Pricing, *, within_budget: bool) -> list[Values]:
    """The uniform policies evaluated first. `within_budget` (objective budget, with
    size/macs/bops limits): for every bits choice of the space (largest first) the largest
    uniform keep that fits, so the study always holds the best uniform policy within the
    budget and the answer can never be worse. Else (the front): float, 8, 4 and 2 bits,
    nothing pruned, the landmarks of the size axis. With activation knobs, W8A8 too (every
    layer 8-bit weights and activations): on the front beside uniform 8-bit, within a
    budget at the largest uniform keep that fits."""
    space = pricing.space
    integer = functools.partial(integer_values, space)
    if not (within_budget and pricing.budget.priced):
        found = [uniform_values(space, bits) for bits in UNIFORM_BASELINE_BITS]
        found += [v for v in map(integer, found) if v is not None]
    else:
        bits_choices = sorted(_choices(space, BITS) or {BITS.reference}, reverse=True)
        keeps = sorted(_choices(space, KEEP) | {KEEP.reference}, reverse=True)
        # W8A8 is its own baseline: under a latency limit it may keep far more channels
        # than float kernels at the same bits (resnet18 here: all of them, at 22% of the
        # float model's latency)
        variants = [(bits, False) for bits in bits_choices] + [(INT8, True)]
        found = []
        for bits, acts in variants:
            fitting = (uniform_values(space, bits, keep) for keep in keeps)
            fitting = (integer(v) if acts else v for v in fitting)
            first = next((v for v in fitting if v is not None and pricing.excess(v) <= 0), None)
            if first is not None:
                found.append(first)
    unique: dict[str, Values] = {}
    for values in found:
        unique.setdefault(pricing.policy(values).hash, values)
    return list(unique.values())


def integer_values(space: SearchSpace, values: Values) -> Values | None:
    """A uniform 8-bit policy with its activations in 8 bits too (W8A8: what integer
    kernels run), where the space has activation knobs; None otherwise."""
    bits = {values[k.name] for k in space.searchable if k.kind == BITS.name}
    acts = [k.name for k in space.searchable if k.kind == ACT_BITS.name and INT8 in k.choices]
    if not acts or bits != {INT8}:
        return None
    return {**values, **dict.fromkeys(acts, INT8)}


def _choices(space: SearchSpace, kind: KnobKind) -> set[Any]:
    """Every choice of the searchable knobs of `kind`."""
    return {c for k in space.searchable if k.kind == kind.name for c in k.choices}


class LossModel:
    """Estimated metric loss of each knob value: measured (a sensitivity table) or a prior."""

    def __init__(self, losses: Mapping[str, Mapping[Any, float]]) -> None:
        self.losses = {name: dict(table) for name, table in losses.items()}

    def __call__(self, knob: Knob, value: Any) -> float:
        return self.losses[knob.name][value]

    @classmethod
    def prior(cls, space: SearchSpace) -> LossModel:
        return cls(
            {k.name: {c: kind_of(k).prior_loss(c) for c in k.choices} for k in space.searchable}
        )

    @classmethod
    def from_table(cls, space: SearchSpace, table: pd.DataFrame, base_metric: float, *,
                   noise: Mapping[str, Mapping[Any, float]] | None = None) -> LossModel:  # fmt: skip
        """Each knob's measured drops, interpolated between probed values and made
        monotone (a lower choice never loses less); knobs with no probe keep the prior.

        With `noise` (orchestrator.noise: per bits knob and choice, the quantization noise
        its weights take), a bits knob whose probes were few or scored on part of the data
        loses its fitted sensitivity times its noise at every choice, and a bits knob not
        probed the typical (median) sensitivity of the others times its noise."""
        measured = {k.name: _drops(table, k, base_metric) for k in space.searchable}
        fitted = _fitted(space, table, measured, noise or {})
        losses = {}
        for knob in space.searchable:
            kind, points = kind_of(knob), measured[knob.name]
            if knob.name in fitted:
                raw = fitted[knob.name]
            elif not points:
                raw = {c: kind.prior_loss(c) for c in knob.choices}
            else:
                # a knob probed at few values (a sensitivity budget): between them its drops
                # follow the kind's prior shape (4x per bit, linear in keep), not a straight line
                partial = len(points) < len(kind.probe_values(knob))
                coord = (lambda x, k=kind: -k.prior_loss(x)) if partial else (lambda x: x)
                raw = {c: _interpolate(points, float(c), coord) for c in knob.choices}
            losses[knob.name] = _monotone(knob, raw)
        return cls(losses)


def _drops(table: pd.DataFrame, knob: Knob, base_metric: float) -> dict[float, float]:
    rows = table[(table["knob"] == knob.name) & table["metric"].notna()]
    return {float(r.value): max(0.0, base_metric - float(r.metric)) for r in rows.itertuples()}


def _fitted(space: SearchSpace, table: pd.DataFrame, measured: Mapping[str, dict[float, float]],
            noise: Mapping[str, Mapping[Any, float]]) -> dict[str, dict[Any, float]]:  # fmt: skip
    """Drops as sensitivity x noise for the bits knobs with noise whose probes do not
    settle their drops: few probe values, or probes on part of the data (whose small drops
    are lost in sampling error; least squares through the origin lets the largest, the
    lowest bits, set the sensitivity), or no probe (the median sensitivity of the rest)."""
    share = table["share"] if "share" in table else pd.Series(1.0, index=table.index)
    low_fidelity = set(table.loc[share.fillna(1.0) < 1, "knob"])
    slopes, wanted = {}, []
    for knob in space.searchable:
        curve = noise.get(knob.name)
        if curve is None:
            continue
        points = {v: d for v, d in measured[knob.name].items() if curve.get(_choice(knob, v))}
        partial = len(measured[knob.name]) < len(kind_of(knob).probe_values(knob))
        if points:
            ns = {v: curve[_choice(knob, v)] for v in points}
            slopes[knob.name] = max(0.0, sum(points[v] * ns[v] for v in points)
                                    / sum(n * n for n in ns.values()))  # fmt: skip
        if not points or partial or knob.name in low_fidelity:
            wanted.append(knob)
    typical = statistics.median(slopes.values()) if slopes else None
    fitted = {}
    for knob in wanted:
        slope = slopes.get(knob.name, typical)
        if slope is not None:
            fitted[knob.name] = {c: slope * noise[knob.name][c] for c in knob.choices}
    return fitted


def _choice(knob: Knob, value: float) -> Any:
    """The knob's choice equal to a table value (tables hold floats)."""
    return next((c for c in knob.choices if float(c) == value), value)


def _monotone(knob: Knob, raw: Mapping[Any, float]) -> dict[Any, float]:
    """From the largest choice down, a lower choice never loses less; the prior breaks ties."""
    worst, table = 0.0, {}
    for c in sorted(knob.choices, reverse=True):
        worst = max(worst, raw[c])
        table[c] = worst + 1e-6 * kind_of(knob).prior_loss(c)
    return table


def _interpolate(points: Mapping[float, float], x: float,
                 coord: Callable[[float], float] = float) -> float:  # fmt: skip
    """Piecewise linear in `coord(value)` (increasing in value) between measured points."""
    xs = sorted(points)
    if x <= xs[0]:
        return points[xs[0]]
    if x >= xs[-1]:
        return points[xs[-1]]
    hi = next(i for i, v in enumerate(xs) if v >= x)
    x0, x1 = xs[hi - 1], xs[hi]
    t0, t1, t = coord(x0), coord(x1), coord(x)
    if t1 == t0:
        return points[x1]
    return points[x0] + (points[x1] - points[x0]) * (t - t0) / (t1 - t0)


def _step(knob: Knob, value: Any, direction: int) -> Any | None:
    """The next choice below (-1) or above (+1) `value`, or None at the end."""
    later = [c for c in knob.choices if (c - value) * direction > 0]
    if not later:
        return None
    return max(later) if direction < 0 else min(later)


class Mover:
    """Repair, fill and local moves over one space, budget and loss model."""

    def __init__(self, pricing: Pricing, loss: LossModel) -> None:
        self.pricing, self.loss = pricing, loss
        self.knobs = pricing.space.searchable

    def repair(self, values: Mapping[str, Any], *, hold: Sequence[str] = ()) -> Values | None:
        """Step knobs down into the budget, each step the one losing the least estimated
        metric per unit of excess removed (knobs in `hold` stay); then fill. None if
        nothing fits. Lazy greedy: a knob's price only rises as the excess shrinks (a cut
        is capped by what is left), so a popped price still below the next one is the
        best step, and each step prices a knob or two instead of all of them."""
        values = self._snap(values)
        excess = self.pricing.excess(values)
        heap = [(-math.inf, i) for i, k in enumerate(self.knobs) if k.name not in hold]
        while excess > 0:
            if not heap:
                return None
            _, i = heapq.heappop(heap)
            step = self._down(values, self.knobs[i], excess)
            if step is None:
                continue  # nothing lower cuts anything: this knob is done
            price, moved, left = step
            if heap and price > heap[0][0]:
                heapq.heappush(heap, (price, i))  # priced stale: another step may be better
                continue
            values, excess = moved, left
            heapq.heappush(heap, (price, i))
        return self.fill(values, hold=hold)

    def _down(
        self, values: Values, knob: Knob, excess: float
    ) -> tuple[float, Values, float] | None:
        """The knob's next lower choice that cuts the excess (lower choices that round to
        the same channels cut nothing): (metric lost per excess cut, values, excess left)."""
        lower, cut = values[knob.name], 0.0
        while cut <= 0:
            lower = _step(knob, lower, -1)
            if lower is None:
                return None
            moved = {**values, knob.name: lower}
            left = self.pricing.excess(moved)
            cut = excess - left
        price = (self.loss(knob, lower) - self.loss(knob, values[knob.name])) / cut
        return price, moved, left

    def fill(self, values: Mapping[str, Any], *, hold: Sequence[str] = ()) -> Values:
        """Step knobs up while the policy still fits, each step the one gaining the most
        estimated metric per unit of budget it uses: a candidate at the budget's edge.
        Lazy greedy, as `repair`: a knob's gain per budget used only falls as others rise
        (they can only make its step cost more), so a popped step still at least as good
        as the next price in the heap is the best one; a knob whose next step does not
        fit or gains nothing never will. Each step prices a knob or two, not all of them
        (issue 15: 81 knobs took 8,000 pricings per fill)."""
        values = self._snap(values)
        if not self.pricing.budget.priced:
            return values
        load = self.pricing.load(values)
        heap = [(-math.inf, i) for i, k in enumerate(self.knobs) if k.name not in hold]
        while heap:
            _, i = heapq.heappop(heap)
            step = self._up(values, self.knobs[i], load)
            if step is None:
                continue  # its next step does not fit or gains nothing: done
            ratio, moved, moved_load = step
            if heap and -ratio > heap[0][0]:
                heapq.heappush(heap, (-ratio, i))  # priced stale: another step may be better
                continue
            values, load = moved, moved_load
            heapq.heappush(heap, (-ratio, i))
        return values

    def _up(self, values: Values, knob: Knob, load: float) -> tuple[float, Values, float] | None:
        """The knob's next higher choice if it fits and gains: (metric gained per budget
        used, values, load)."""
        higher = _step(knob, values[knob.name], +1)
        if higher is None:
            return None
        gain = self.loss(knob, values[knob.name]) - self.loss(knob, higher)
        if gain <= 0:
            return None
        moved = {**values, knob.name: higher}
        excess, moved_load = self.pricing.measure(moved)
        if excess > 0:
            return None
        return gain / max(moved_load - load, 1e-12), moved, moved_load

    def _snap(self, values: Mapping[str, Any]) -> Values:
        """Values as the knobs' own choices (a float sampler's 0.15000000000000002 is 0.15)."""
        return {**values, **{k.name: nearest(k, values[k.name]) for k in self.knobs}}

    def local_move(self, incumbent: Mapping[str, Any], rng: random.Random,
                   seen: Callable[[str], bool]) -> Values | None:  # fmt: skip
        """A new policy near the incumbent, within the budget: raise one knob (the more it
        would gain, the likelier) and repair the rest around it, set one random knob to
        any other choice, or move one or two random knobs a step either way, each then
        repaired and filled. None if every draw was evaluated already (`seen` by hash)."""
        for _ in range(MOVE_TRIES):
            values, hold = self._draw(self._snap(incumbent), rng)
            moved = self.repair(values, hold=hold)
            if moved is not None and not seen(self.pricing.policy(moved).hash):
                return moved
        return None

    def _draw(self, values: Values, rng: random.Random) -> tuple[Values, list[str]]:
        """Knobs moved from `values`, and those knobs (held where they were moved: the
        repair may not lower a raised knob, nor the fill raise a lowered one back): one
        knob a step up, one knob to any other choice (a jump), or one or two knobs a step."""
        if rng.random() < 0.5:
            raises = [(k, _step(k, values[k.name], +1)) for k in self.knobs]
            raises = [(k, up) for k, up in raises if up is not None]
            if raises:
                gains = [self.loss(k, values[k.name]) - self.loss(k, up) + 1e-9 for k, up in raises]
                knob, up = rng.choices(raises, weights=gains)[0]
                return {**values, knob.name: up}, [knob.name]
        if rng.random() < JUMP_SHARE:
            knob = rng.choice(self.knobs)
            others = [c for c in knob.choices if c != values[knob.name]]
            if others:
                return {**values, knob.name: rng.choice(others)}, [knob.name]
        hold = []
        for knob in rng.sample(list(self.knobs), k=min(len(self.knobs), rng.choice((1, 2)))):
            direction = rng.choice((-1, 1))
            moved = _step(knob, values[knob.name], direction)
            if moved is not None:
                values[knob.name] = moved
                hold.append(knob.name)
        return values, hold


class LocalShare:
    """Which asks are local moves: every other one while they pay; after each
    `patience` local moves without a better incumbent, half as many (down to one in
    `sparsest`). Measured on MiniLM at 100 trials: local moves settle around the
    incumbent after ~40 trials, while the sampler's asks keep finding better policies."""

    def __init__(self, patience: int = LOCAL_PATIENCE, sparsest: int = LOCAL_SPARSEST) -> None:
        self.patience, self.sparsest = patience, sparsest
        self.stale = 0  # local moves since the incumbent last improved
        self.waited = 0  # asks since the last local move

    @property
    def every(self) -> int:
        """One ask in this many is a local move now."""
        return min(2 << (self.stale // self.patience), self.sparsest)

    def turn(self) -> bool:
        """Whether this ask (one with an incumbent to move from) is a local move."""
        self.waited += 1
        if self.waited < self.every:
            return False
        self.waited = 0
        self.stale += 1
        return True

    def improved(self) -> None:
        """The incumbent got better: local moves pay again."""
        self.stale = 0


def knapsack_seed(mover: Mover, kinds: Sequence[str], *, resolution: int = 20000) -> Values | None:
    """The policy of the budget's edge that an exact multiple-choice knapsack picks over
    the knobs of `kinds` (the rest at their largest choice): each knob's options priced
    exactly one at a time, valued by minus their estimated loss. Sizes of a layer's bits
    and keep knobs are not additive, so the knapsack's capacity is bisected until the
    exactly priced policy fits; then filled. None if nothing fits. Costs are rounded to
    1/`resolution` of their summed spans, so a seed may miss the edge by that much times
    the knobs (the fill then closes most of it)."""
    from orchestrator import knapsack

    pricing = mover.pricing
    top = {k.name: max(k.choices) for k in mover.knobs}
    knobs = [k for k in mover.knobs if k.kind in kinds]
    if not knobs or not pricing.budget.limits:
        return None
    # cost of each option: its share of the limits above the knob's smallest choice
    loads = [[pricing.load({**top, k.name: c}) for c in k.choices] for k in knobs]
    spans = [max(ls) - min(ls) for ls in loads]
    unit = max(sum(spans) / resolution, 1e-12)
    options = [[(round((load - min(ls)) / unit), -mover.loss(k, c))
                for load, c in zip(ls, k.choices, strict=True)]
               for k, ls in zip(knobs, loads, strict=True)]  # fmt: skip

    def pick(capacity: int) -> Values | None:
        chosen = knapsack.solve(options, capacity)
        if chosen is None:
            return None
        return {**top, **{k.name: k.choices[j] for k, j in zip(knobs, chosen, strict=True)}}

    low, high, best = 0, sum(max(c for c, _ in o) for o in options), None
    while low <= high:  # the largest capacity whose exactly priced pick fits
        middle = (low + high) // 2
        values = pick(middle)
        if values is not None and pricing.excess(values) <= 0:
            best, low = values, middle + 1
        else:
            high = middle - 1
    return None if best is None else mover.fill(best)


def budget_seeds(mover: Mover) -> list[Values]:
    """Seeds at the budget's edge: the knapsack over bits alone (nothing pruned: on a
    pretrained model a bit usually costs less metric than a channel) and over every knob."""
    found = [knapsack_seed(mover, (BITS.name,)), knapsack_seed(mover, (BITS.name, KEEP.name))]
    unique: dict[str, Values] = {}
    for values in found:
        if values is not None:
            unique.setdefault(mover.pricing.policy(values).hash, values)
    return list(unique.values())
