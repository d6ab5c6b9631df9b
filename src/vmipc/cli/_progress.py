"""Progress a person can watch, or a script can read, while a long command runs.

``--progress auto`` (the default) draws a bar on standard error while both standard
output and standard error are terminals, and stays quiet otherwise (a pipe, a file, a
script); ``bar`` always draws it, ``json`` writes one JSON object per line on standard
error, ``none`` nothing. The numbers are the VMM's ``progress`` events (protocol 1.8:
bytes of guest RAM gone through, about four a second) and, for the sequences, the name of
the step that runs.

The bar is tqdm's: small, imported only when a bar is drawn (``vmipc call`` stays fast),
rate and time left included, and it behaves on narrow terminals and in CI logs; rich would
bring a whole rendering engine for one bar.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from typing import Any

MODES = ("auto", "bar", "json", "none")


def add_progress_argument(parser: Any) -> None:
    parser.add_argument(
        "--progress",
        choices=MODES,
        default="auto",
        help="a progress bar on standard error (auto: only when stdout and stderr are "
        "terminals), JSON lines on standard error (json), or none",
    )


def view_for(mode: str) -> ProgressView | None:
    """The view ``mode`` asks for here, or None when it shows nothing."""
    if mode == "auto":
        mode = "bar" if sys.stdout.isatty() and sys.stderr.isatty() else "none"
    return ProgressView(mode) if mode in ("bar", "json") else None


class ProgressView:
    """One line of progress: the step that runs, and a bar of the current transfer."""

    def __init__(self, mode: str) -> None:
        self.json = mode == "json"
        self._bar: Any = None
        self._phase = ""
        self._step = ""
        #: where a migration's pre-copy stands, shown beside every bar after it
        self._note = ""

    def step(self, name: str) -> None:
        """A sequence's step begins (its ``on_step`` hook)."""
        self._step = name
        if self.json:
            self._emit({"step": name})
            return
        # a step of its own (seal, verify, resume...): the last transfer's bar gives way
        # to the step's name and how long it has run
        from tqdm import tqdm  # type: ignore[import-untyped]

        self.close()
        self._phase = ""
        self._bar = tqdm(
            desc=name,
            bar_format="{desc} [{elapsed}{postfix}]",
            file=sys.stderr,
            leave=False,
            total=0,
            postfix=self._note or None,
        )

    def update(self, data: Mapping[str, Any]) -> None:
        """A ``progress`` event's data: ``phase``, ``done``, ``total`` (or None); or where
        a migration's pre-copy stands (``predicted_downtime_s``...)."""
        if "predicted_downtime_s" in data:
            self._precopy(data)
            return
        phase, done, total = str(data.get("phase", "")), data.get("done"), data.get("total")
        if not isinstance(done, int):
            return
        total = total if isinstance(total, int) and total > 0 else None
        if self.json:
            self._emit(
                {"step": self._step, "command": data.get("command"), "phase": phase,
                 "done": done, "total": total}
            )  # fmt: skip
            return
        if self._bar is None or phase != self._phase or (self._bar.total or None) != total:
            self._new_bar(phase, total)
        self._bar.update(done - self._bar.n)

    def _precopy(self, data: Mapping[str, Any]) -> None:
        if self.json:
            self._emit({"step": self._step, **data})
            return
        mib = 1 << 20
        self._note = (
            f"{data.get('rounds', 0)} rounds, {data.get('sent_bytes', 0) / mib:.0f} MiB sent, "
            f"{data.get('dirty_bytes', 0) / mib:.1f} MiB dirty, downtime "
            f"~{data['predicted_downtime_s'] * 1000:.0f} ms"
        )
        if self._bar is not None:
            self._bar.set_postfix_str(self._note)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _label(self, phase: str) -> str:
        return " ".join(part for part in (self._step, phase) if part)

    def _new_bar(self, phase: str, total: int | None) -> None:
        from tqdm import tqdm  # only when a bar is drawn

        self.close()
        self._phase = phase
        self._bar = tqdm(
            total=total,
            desc=self._label(phase),
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=sys.stderr,
            leave=False,
            dynamic_ncols=True,
            # the VMM sends about four reports a second: show each
            mininterval=0,
            miniters=1,
            postfix=self._note or None,
        )

    def _emit(self, fields: dict[str, Any]) -> None:
        print(json.dumps({"time": round(time.time(), 3), **fields}), file=sys.stderr, flush=True)
