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

    def update_status(self, busy: int, workers: int, best: tuple[float, int] | None) -> None:
        shown = f"{best[0]:.4f} @ {format_bytes(best[1])}" if best else "-"
        self._bar.set_postfix_str(f"workers busy {busy}/{workers}, best {shown}", refresh=False)
