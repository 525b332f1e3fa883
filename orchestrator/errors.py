"""Errors the CLI turns into one clear line and exit code 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConfigError(ValueError):
    """Bad input found before any work starts: the message names the key and the fix."""


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """A ' (did you mean X?)' suffix, or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


class WorkerStartError(RuntimeError):
    """A worker could not start or load the task (the CLI prints it as one line, exit 1)."""


class JobError(RuntimeError):
    """The Ray job server refused or failed a request (one line, exit 1)."""


class ResultsError(RuntimeError):
    """Results could not be recorded or uploaded (one line, exit 1; the message says
    where the finished trials are)."""


class RayLostError(RuntimeError):
    """The Ray a run uses went away (its raylet or GCS died): one line saying what was
    lost, exit 1; the run's finished trials are durable and the study resumable."""
