"""A live progress bar: trials done/total, workers busy, best metric within budget, ETA."""

from __future__ import annotations

import sys

from tqdm import tqdm

from orchestrator.budget import format_bytes


class Progress:
    def __init__(self, *, total: int, initial: int, quiet: bool) -> None:
        self._bar = tqdm(total=total, initial=initial, disable=quiet, unit="trial",
                         desc="search", file=sys.stderr, dynamic_ncols=True, leave=True)  # fmt: skip

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self._bar.close()

    def advance(self) -> None:
        self._bar.update(1)

    def update_status(self, busy: int, workers: int, best: tuple[float, int] | None, *,
                      behind: int | None = None) -> None:  # fmt: skip
        """`behind`: results the recorder has yet to write, shown while they hold new
        evaluations back (orchestrator.dispatcher.UNRECORDED_MIN)."""
        shown = f"{best[0]:.4f} @ {format_bytes(best[1])}" if best else "-"
        waiting = f", waiting for the recorder ({behind} to write)" if behind is not None else ""
        self._bar.set_postfix_str(f"workers busy {busy}/{workers}, best {shown}{waiting}",
                                  refresh=False)  # fmt: skip
