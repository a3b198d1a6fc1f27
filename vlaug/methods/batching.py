"""Batched logistic fitting: one optimiser loop for many probes.

:mod:`vlaug.evaluate` creates one :class:`ProbeSolver` per run, with the run's data and
splits, and hands it to every method (:meth:`~vlaug.methods.base.Method.fit_seeds`). It
fits the full weight-decay searches of several probe methods on every seed as one batch
(:meth:`ProbeSolver.search_together`, which returns them) and gives a method the seeds'
rows of the cache as one set of rows, a weight column per seed
(:meth:`ProbeSolver.union_rows`), for the refits it batches itself. A method takes part
by implementing :meth:`~vlaug.methods.base.Method.batch_values` and
:meth:`~vlaug.methods.base.Method.batch_plan`; the same fits as one at a time.
"""

from __future__ import annotations

import numpy as np
import torch

from vlaug.methods.base import Method, RunData, Search
from vlaug.probe import PRECONDITIONER_VALUES, Rows, choose, fit_probes

# The seeds of a method are fitted as one batch (fit_seeds): one optimiser loop, one pass over
# the rows per evaluation for all of them (streamed: one read of the cache, not one per seed).
# Rows of the cache are shared: the union of the seeds' rows, each seed's weighted in its own
# column, when the union holds at most this many times a seed's rows (by default each seed's
# validation rows are the others' training rows: 1.25 x; a row outside a seed's set costs its
# problems arithmetic for nothing).
UNION_LIMIT = 1.5
# Rows a method builds (its extras) differ between seeds: each seed's block is evaluated under
# its own problems only (a block's owner, see vlaug.probe.Rows). They are built for every seed
# (and, in search_together, every method) at once, so only while all of them hold at most this
# many values (small runs, whose time is the optimiser's loop); otherwise, and when streamed,
# each seed is fitted on its own.
BUILT_BATCH_VALUES = 2**26
# A batch of P problems holds about (3 x history + 6) x (d + 1) x C values per problem of
# optimiser state (L-BFGS pairs and the pairs' preconditioned y, iterates, gradients, starts,
# anchors); batches stay within this many values (512 MB of float32: 72 problems at d = 512,
# C = 100; one seed's grid at d = 1024, C = 400 is fitted as before, one seed at a time).
BATCH_STATE_VALUES = 2**27


class ProbeSolver:
    """The batched fits of one run: its data and every seed's splits."""

    def __init__(self, data: RunData, splits: list) -> None:
        self.data = data
        self.splits = list(splits)

    def state_fits(self, n_problems: int) -> bool:
        """Whether a batch of ``n_problems`` probes keeps its optimiser state within BATCH_STATE_VALUES."""
        return n_problems * 36 * (self.data.embed_dim + 1) * self.data.n_classes <= BATCH_STATE_VALUES

    def search_together(self, methods: list[Method]) -> dict[str, dict[int, Search]]:
        """The full weight-decay searches of several probe methods on every seed, as one batch:
        one optimiser loop and one pass over the rows per evaluation for every method x seed x
        weight decay. The methods without extras share the rows of the cache (the union of the
        seeds' rows, a weight column per seed); each method's built rows are evaluated under its
        own problems only. The same fits as one search at a time; on small runs, whose time is
        the optimiser's loop, much less time (vlaug.evaluate calls it with every method of the
        run). Seeds with the same training rows (a cache's fixed split) share one column and
        its fits. Returns each batched method's searches by seed, under the method's text; methods
        that cannot share (:meth:`Method.batch_values` None, BATCH_STATE_VALUES) are left out."""
        data, splits = self.data, self.splits
        s, grid = len(splits), list(data.settings.grid)
        # seeds with the same training rows (a cache's fixed split: every seed's rows alike) share one column
        # and one set of fits of the cache's rows; a method's built rows differ by seed (its own draws)
        distinct, column_of = [], []
        for t in (np.asarray(split.train) for split in splits):
            k = next((i for i, u in enumerate(distinct) if np.array_equal(u, t)), len(distinct))
            distinct += [t] if k == len(distinct) else []
            column_of.append(k)
        # within BUILT_BATCH_VALUES of built rows and BATCH_STATE_VALUES of state
        chosen, room, n_problems = [], BUILT_BATCH_VALUES, 0
        for m in methods:
            built = m.batch_values(data, splits)
            more = (s if built else len(distinct)) * len(grid)
            if built is not None and built <= room and self.state_fits(n_problems + more):
                chosen.append(m)
                room -= built
                n_problems += more
        if not chosen or (len(chosen) * s < 2):
            return {}  # nothing to share
        plans = [(m, m.batch_plan(data, splits)) for m in chosen]
        shared = self.union_rows(distinct) if any(plan.per_seed is None for _, plan in plans) else None
        plans = [(m, plan) for m, plan in plans if plan.per_seed is not None or shared is not None]
        if not plans:
            return {}
        owned, base, columns = [], {}, len(distinct)  # a method's built rows: each seed's blocks, owned by its column
        for m, plan in plans:
            base[m] = 0 if plan.per_seed is None else columns
            if plan.per_seed is not None:
                owned += [(*block[:3], None, columns + j) for j, rows in enumerate(plan.per_seed) for block in rows.blocks()]
                columns += s
        uses_shared = any(plan.per_seed is None for _, plan in plans)

        def blocks():  # the cache's rows (resident: one block; streamed: read again), a column a set; then the built
            if uses_shared:
                for block in shared.blocks():
                    owner = block[4] if len(block) > 4 else (0, len(distinct))
                    yield *block[:3], block[3] if len(block) > 3 else None, owner
            yield from owned

        rows = Rows(blocks, data.embed_dim, data.n_classes, (shared.n_rows if uses_shared else 0) + sum(len(b[1]) for b in owned),
                    data.device, columns=columns)
        d, c = data.embed_dim, data.n_classes
        sets = {m: range(s) if plan.per_seed is not None else range(len(distinct)) for m, plan in plans}
        problems = [(m, plan, j, wd) for m, plan in plans for j in sets[m] for wd in grid]
        start = [plan.init or (torch.zeros(d, c, device=data.device), torch.zeros(c, device=data.device))
                 for _, plan, _, _ in problems]
        anchors = None
        if any(plan.anchor is not None for _, plan in plans):
            zero = torch.zeros(d, c, device=data.device)
            anchors = torch.stack([zero if plan.anchor is None else plan.anchor for _, plan, _, _ in problems])
        fits = fit_probes(rows, [wd for *_, wd in problems], data.settings.max_iter,
                          init=(torch.stack([w for w, _ in start]), torch.stack([b for _, b in start])),
                          regularize_towards=anchors, columns=[base[m] + j for m, _, j, _ in problems])
        k = len(grid)  # problems per method and set of rows
        found, first = {}, 0
        for m, plan in plans:
            searched = {}
            for j, val in enumerate(plan.vals):
                at = first + (j if plan.per_seed is not None else column_of[j]) * k
                best, search = choose(fits[at:at + k], grid, data.labelled_rows(val), m.scorer(data, val))
                searched[j] = Search(best, search, best["W"], best["b"], plan.per_seed[j] if plan.per_seed else None,
                                     train=plan.trains[j])
            found[m.text] = searched
            first += len(sets[m]) * k
        return found

    def grids_together(self, trains: list[np.ndarray], init, anchor) -> list[list[tuple]] | None:
        """The weight-decay grid's fits of the distinct training sets ``trains`` (rows of a
        resident cache, without extras) that :meth:`search_together`'s union could not hold
        (DomainBed's splits: 10 sets per split seed, each two or three domains' ``in`` rows),
        in groups of up to PATTERN_SEEDS consecutive sets: each group's union of rows, a
        weight column per set, in blocks by the sets that hold them (a domain's rows: under
        the sets that train on it only), one optimiser loop for the group's sets x weight
        decays. The same fits as each set's own grid (the same preconditioners, per set and
        weight decay). Returns the fits per set, in order; None where the rows are streamed,
        a set holds a row twice or a group's optimiser state would not fit BATCH_STATE_VALUES.
        (Fitting the first decade past the weak end in the same batch, for the splits whose
        search goes there, cost as much as fitting it afterwards: not done.)"""
        data, grid = self.data, list(self.data.settings.grid)
        if data.x is None or any(len(np.unique(t)) != len(t) for t in trains):
            return None
        # at most this many sets a group: PATTERN_SEEDS columns, the optimiser's state, and a preconditioner per set and
        # weight decay (beyond PRECONDITIONER_VALUES they would be pooled: another path, up to 3x the iterations)
        size = min(PATTERN_SEEDS, len(trains))
        while size > 1 and not (self.state_fits(size * len(grid))
                                and size * len(grid) * (data.embed_dim + 1) ** 2 <= PRECONDITIONER_VALUES):
            size -= 1
        if size < 2:
            return None
        fits = []
        for group in _compact_groups(trains, size):
            union = np.unique(np.concatenate(group))
            rows = self.union_rows(group, union, min_rows=max(GROUP_PATTERN_ROWS, len(union) // 64))
            out = fit_probes(rows, grid * len(group), data.settings.max_iter, init=init, regularize_towards=anchor,
                             columns=[j for j in range(len(group)) for _ in grid])
            fits += [out[j * len(grid):(j + 1) * len(grid)] for j in range(len(group))]
        return fits

    def union_index(self, trains: list[np.ndarray]) -> np.ndarray | None:
        """The union of the seeds' training rows ``trains``, sorted; None when it is larger than
        UNION_LIMIT x a seed's rows, or a seed holds a row twice (one weight could not hold both)."""
        data = self.data
        if any(len(t) > 1 and not (t[1:] > t[:-1]).all() and len(np.unique(t)) != len(t) for t in trains):
            return None
        member = np.zeros(len(data.y), dtype=bool)  # the union, sorted, without sorting millions of row ids
        for t in trains:
            member[t] = True
        union = np.flatnonzero(member)
        if len(union) > UNION_LIMIT * sum(len(t) for t in trains) / len(trains):
            return None  # too many rows unused by each seed
        return union

    def union_rows(self, trains: list[np.ndarray], union: np.ndarray | None = None, min_rows: int | None = None
                   ) -> Rows | None:
        """The training rows ``trains`` of several seeds, rows of the cache (resident or
        streamed), as one set of rows: the union of the seeds' rows (``union``, or
        :meth:`union_index`), with a weight column per seed (0 where a row is not the seed's),
        read once per pass for all of them; None where :meth:`union_index` is. Resident, in
        blocks by the seeds that hold them (:func:`membership_blocks`, ``min_rows``)."""
        data, s = self.data, len(trains)
        union = self.union_index(trains) if union is None else union
        if union is None:
            return None
        y = data.y[data.rows(union)]
        weights = torch.zeros(len(union), s, device=data.device)
        for j, t in enumerate(trains):
            labels = data.y[data.rows(t)]
            per_class = data.class_weights(torch.bincount(labels, minlength=data.n_classes).float())
            weights[data.rows(np.searchsorted(union, t)), j] = per_class[labels]
        if data.x is not None:  # the resident cache itself, indexed: no copy
            built = membership_blocks(data.x, y, weights, data.rows(union), min_rows)
            return Rows(lambda: built, data.embed_dim, data.n_classes, len(union), data.device, columns=s)

        def blocks():
            for pos, x in data.stream(union):
                at = data.rows(pos)
                yield x, y[at], weights[at]

        return Rows(blocks, data.embed_dim, data.n_classes, len(union), data.device, columns=s)


def _compact_groups(trains: list[np.ndarray], size: int) -> list[list[np.ndarray]]:
    """``trains`` in groups of at most ``size`` consecutive sets, a new group started where a
    set would take the group's union beyond UNION_LIMIT x its largest set (DomainBed's splits:
    one group per split seed, whose sets are unions of the same domains' ``in`` rows; another
    seed's sets hold other rows, and would split every domain's block into finer patterns)."""
    n = 1 + max((int(t.max()) for t in trains if len(t)), default=0)
    groups, members, largest = [], None, 0
    for t in trains:
        if members is not None and len(groups[-1]) < size:
            grown = members.copy()
            grown[t] = True
            if int(grown.sum()) <= UNION_LIMIT * max(largest, len(t)):
                groups[-1].append(t)
                members, largest = grown, max(largest, len(t))
                continue
        groups.append([t])
        members, largest = np.zeros(n, dtype=bool), len(t)
        members[t] = True
    return groups


# A row of the union outside a seed's set weighs 0 in that seed's column, and costs its problems
# arithmetic for nothing (with 5 seeds' default splits, a fifth of a refit's products). Rows
# that the same seeds hold (a membership pattern) of at least this many are a block of their
# own, evaluated under those seeds' problems only; the rest stay one block under every seed
# (small sets: each block costs every evaluation its own dozen operators).
PATTERN_ROWS = 4096
PATTERN_SEEDS = 16  # more seeds than this: one block
# ProbeSolver.grids_together's sets (DomainBed's: a domain's rows are a pattern of about a
# quarter of the union): a pattern of this many rows is a block of its own (at least 1/64 of the
# union). On a PACS-size cache, one split seed's 10 sets in 4 blocks took 0.76x the time of the
# 10 grids one at a time (one block under every set: 0.94x).
GROUP_PATTERN_ROWS = 256


def membership_blocks(x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, index: torch.Tensor,
                      min_rows: int | None = None) -> list[tuple]:
    """The union's rows ``x[index]`` (labels ``y``, a weight column per seed, 0 outside its
    set) as blocks ``(x, labels, weights, index, owner)``: one per membership pattern of at
    least ``min_rows`` rows (default PATTERN_ROWS; owner: its seeds' columns), the rest under
    every column; each block's rows in cache order."""
    s = weights.shape[1]
    min_rows = PATTERN_ROWS if min_rows is None else min_rows
    if s < 2 or s > PATTERN_SEEDS or len(index) < 2 * min_rows:
        return [(x, y, weights, index)]
    code = torch.zeros(len(index), dtype=torch.int32, device=weights.device)  # bit j: in seed j's set
    for j in range(s):
        code |= (weights[:, j] > 0).to(torch.int32) << j
    counts = torch.bincount(code, minlength=2**s)
    own = [int(k) for k in (counts >= min_rows).nonzero().flatten() if 0 < k < 2**s - 1]
    if not own:
        return [(x, y, weights, index)]
    blocks, rest = [], torch.ones(len(code), dtype=torch.bool, device=code.device)
    for k in own:
        at = (code == k).nonzero().flatten()
        cols = torch.tensor([j for j in range(s) if k >> j & 1], device=weights.device)
        blocks.append((x, y[at], weights[at][:, cols], index[at], cols))
        rest[at] = False
    at = rest.nonzero().flatten()
    if len(at):
        blocks.append((x, y[at], weights[at], index[at]))
    return blocks
