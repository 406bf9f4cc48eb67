"""Say when two variants could not differ, instead of printing equal rows silently.

Two kinds of reasons:
- by construction: with K = 3 slots (the ground truth, one middle slot, the newest) the only pair
  1 < i < j <= K is (2, 3), so rules A, C and D all fuse slot 2 into slot 3 and drop it: the same
  computation. And a memory that never fills (memory entries below K at the end of every
  sequence) never runs any update rule, so all rules are the same model reading the same slots.
- by observation: rows whose J, F and J&F are all equal (to 1e-9): said as such, with the
  checkpoint note when both came from the same model.
"""

from __future__ import annotations

from collections.abc import Sequence, Set
from itertools import combinations

SAME_PAIR_RULES = ("A", "C", "D")  # at K = 3 they choose the one pair (2, 3) and fuse 2 into 3


def _scores(row) -> tuple | None:
    m = row.metrics
    values = (m.get("JF_mean"), m.get("J_mean"), m.get("F_mean"))
    return None if any(v is None for v in values) else values


def construction_notes(rows: Sequence) -> list[str]:
    """Notes for STRMN rows whose rules cannot choose differently at their K."""
    notes = []
    by_size: dict[int, list] = {}
    for r in rows:
        if r.model == "strmn" and r.size:
            by_size.setdefault(r.size, []).append(r)
    for k, group in sorted(by_size.items()):
        same = [r for r in group if r.rule in SAME_PAIR_RULES]
        if k == 3 and len(same) > 1:
            rules = ", ".join(r.rule for r in same)
            notes.append(f"Rules {rules} could not differ at K = 3: the only pair of non-ground-truth slots is "
                         "(2, 3), so each fuses slot 2 into slot 3 and drops it. Use K >= 4 (memory.slots, strmn.slots) "
                         "for the rules to choose different pairs.")
        entries = [r.metrics.get("memory_entries") for r in group]
        if len(group) > 1 and all(e is not None and e < k for e in entries):
            notes.append(f"The K = {k} variants could not differ: their memory never filled (at most "
                         f"{max(entries):.0f} entries held at the end), so no update rule ever ran. Use longer "
                         "sequences or a smaller K.")
    return notes


def identical_notes(rows: Sequence, covered: Set[str] = frozenset()) -> list[str]:
    """Notes for pairs of rows with identical scores (not already explained by `covered` rules)."""
    notes = []
    for a, b in combinations([r for r in rows if r.model != "none"], 2):
        sa, sb = _scores(a), _scores(b)
        if sa is None or sb is None or any(abs(x - y) > 1e-9 for x, y in zip(sa, sb)):
            continue
        if a.model == b.model == "strmn" and {a.rule, b.rule} <= covered:
            continue
        notes.append(f"{a.variant} and {b.variant} scored identically (J&F {100 * sa[0]:.1f}): on this benchmark "
                     "they made the same predictions, so their rows do not compare the two settings.")
    return notes


def distinct_notes(rows: Sequence) -> list[str]:
    """Every 'could not differ' note for the report, construction first."""
    notes = construction_notes(rows)
    covered = set(SAME_PAIR_RULES) if any("K = 3" in n for n in notes) else set()
    return notes + identical_notes(rows, covered)
