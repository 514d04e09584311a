"""Choose the fastest plan that fits the memory budgets, by predicting each candidate's step.

Knows nothing of models: a caller (fuyou.planning.search) enumerates candidate plans, each with the knobs
that define it, the bytes it needs per memory tier and a function building its step graph. The
planner predicts every candidate with the cost model, drops those over a budget and returns the
fastest; among plans within `tie_rel` of the fastest it takes the caller's preferred one (e.g. the
micro-batch count asked for, then the least memory). It never returns a plan the model predicts
slower than the naive one (when the naive plan fits): the naive plan is always a candidate.
When nothing fits it reports the smallest budgets with which something would.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence

from .costmodel import Prediction, Rates, predict
from .graph import Graph

TIE_REL = 0.005  # plans within 0.5% of the fastest are "as fast": below the cost model's resolution


@dataclass
class Candidate:
    knobs: Mapping[str, object]  # what defines the plan (shown to the user)
    memory_bytes: Mapping[str, int]  # tier -> bytes the plan needs ("gpu", "cpu", "ssd", ...)
    build: Callable[[], Graph]  # the step graph of this plan
    preference: tuple = ()  # lower is preferred among equally fast plans
    extra: Mapping[str, object] = field(default_factory=dict)  # caller data carried to the result


@dataclass
class Evaluated:
    candidate: Candidate
    prediction: Prediction

    @property
    def step_s(self) -> float:
        return self.prediction.step_s


@dataclass
class Choice:
    best: Optional[Evaluated]  # None when nothing fits
    naive: Optional[Evaluated]  # the naive plan (None if it was not given)
    fitting: List[Evaluated]  # every candidate within the budgets, fastest first
    minimum_budgets: Optional[Dict[str, int]]  # when nothing fits: budgets with which a plan would
    minimum_candidate: Optional[Candidate] = None  # the plan that fits minimum_budgets


def fits(memory_bytes: Mapping[str, int], budgets: Mapping[str, Optional[int]]) -> bool:
    """Every tier with a budget (None = unconstrained) holds what the plan needs there."""
    return all(b is None or memory_bytes.get(t, 0) <= b for t, b in budgets.items())


def choose(
    candidates: Sequence[Candidate],
    budgets: Mapping[str, Optional[int]],
    rates: Rates,
    *,
    naive: Optional[Candidate] = None,
    lanes: Optional[Mapping[str, int]] = None,
    tie_rel: float = TIE_REL,
) -> Choice:
    pool = list(candidates)
    if naive is not None and all(c is not naive for c in pool):
        pool.append(naive)
    fitting_c = [c for c in pool if fits(c.memory_bytes, budgets)]
    if not fitting_c:
        need, cand = minimum_budgets(pool, budgets)
        naive_ev = Evaluated(naive, predict(naive.build(), rates, lanes)) if naive is not None else None
        return Choice(None, naive_ev, [], need, cand)
    evaluated = [Evaluated(c, predict(c.build(), rates, lanes)) for c in fitting_c]
    evaluated.sort(key=lambda e: e.step_s)
    naive_ev = next((e for e in evaluated if e.candidate is naive), None)
    if naive is not None and naive_ev is None:
        naive_ev = Evaluated(naive, predict(naive.build(), rates, lanes))
    fastest = evaluated[0].step_s
    limit = fastest * (1 + tie_rel)
    if naive_ev is not None and naive_ev in evaluated:
        limit = min(limit, naive_ev.step_s)  # never slower than the naive plan
    near = [e for e in evaluated if e.step_s <= limit]
    best = min(near, key=lambda e: (tuple(e.candidate.preference), sum(e.candidate.memory_bytes.values()), e.step_s))
    return Choice(best, naive_ev, evaluated, None)


def minimum_budgets(candidates: Sequence[Candidate], budgets: Mapping[str, Optional[int]]) -> tuple:
    """Smallest budgets (per constrained tier) that some candidate fits, and that candidate.

    The tier-wise minimum over all candidates when one candidate reaches it; otherwise the candidate
    that overshoots the given budgets least (its worst tier ratio), with its own needs."""
    if not candidates:
        raise ValueError("no candidate plans to choose from")
    tiers = [t for t, b in budgets.items() if b is not None] or sorted({t for c in candidates for t in c.memory_bytes})
    low = {t: min(c.memory_bytes.get(t, 0) for c in candidates) for t in tiers}
    for c in candidates:
        if all(c.memory_bytes.get(t, 0) <= low[t] for t in tiers):
            return low, c

    def overshoot(c: Candidate) -> float:
        return max(c.memory_bytes.get(t, 0) / max(budgets.get(t) or 1, 1) for t in tiers)

    c = min(candidates, key=overshoot)
    return {t: max(c.memory_bytes.get(t, 0), budgets.get(t) or 0) for t in tiers}, c
