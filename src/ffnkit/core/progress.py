"""Progress as events: long operations report ``ProgressEvent`` (stage, done, total) to a listener.

A listener is any callable taking one :class:`ProgressEvent`. tqdm is one listener (:class:`TqdmListener`,
bars on stderr); a server can forward the events to a client instead. Every ``progress`` argument in
ffnkit takes a listener, or ``True`` (tqdm bars) / ``False`` / ``None`` (silent), see :func:`as_listener`.

Within one stage the events are: ``done=0`` when it starts, then after each step, and one last event
with ``end=True`` when it finishes (also after an error), so a listener can close what it opened.

Example:
    >>> events = []
    >>> for x in track(range(3), events.append, "demo"):
    ...     pass
    >>> [(e.stage, e.done, e.total, e.end) for e in events][-1]
    ('demo', 3, 3, True)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, TypeVar

__all__ = [
    "ProgressEvent",
    "ProgressLike",
    "ProgressListener",
    "Stage",
    "TqdmListener",
    "as_listener",
    "track",
]

T = TypeVar("T")


@dataclass(frozen=True)
class ProgressEvent:
    """One progress report: ``done`` of ``total`` (None: unknown) ``unit``s of ``stage``.

    ``info`` carries stage-specific numbers (e.g. the current loss); ``end`` marks the stage's last event.

    Example:
        >>> ProgressEvent("perplexity", 2, 8, "batch").to_dict()["done"]
        2
    """

    stage: str
    done: int
    total: int | None = None
    unit: str = "step"
    end: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (what a server streams)."""
        return asdict(self)


class ProgressListener(Protocol):
    """Anything called with each :class:`ProgressEvent` (a plain function works)."""

    def __call__(self, event: ProgressEvent) -> None: ...


ProgressLike = bool | ProgressListener | Callable[[ProgressEvent], None] | None


class TqdmListener:
    """Draws one tqdm bar per stage on stderr (what ``progress=True`` means).

    Example:
        >>> listener = TqdmListener()
        >>> for _ in track(range(100), listener, "work"):
        ...     pass
    """

    def __init__(self, leave: bool = False) -> None:
        self.leave = leave
        self._bars: dict[str, Any] = {}

    def __call__(self, event: ProgressEvent) -> None:
        bar = self._bars.get(event.stage)
        if bar is None:
            if event.end and event.done == 0:
                return  # a stage that ends before it starts draws nothing
            from tqdm.auto import tqdm

            bar = tqdm(total=event.total, desc=event.stage, unit=event.unit, leave=self.leave)
            self._bars[event.stage] = bar
        if event.total != bar.total:
            bar.total = event.total
        bar.update(event.done - bar.n)
        if event.info:
            bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in event.info.items()})
        if event.end:
            bar.close()
            del self._bars[event.stage]


def as_listener(progress: ProgressLike) -> ProgressListener | None:
    """Turn a ``progress`` argument into a listener: ``True`` → tqdm bars, ``False``/``None`` → none, a
    callable → itself.

    Example:
        >>> as_listener(False) is None, callable(as_listener(True))
        (True, True)
    """
    if progress is None or progress is False:
        return None
    if progress is True:
        return TqdmListener()
    if callable(progress):
        return progress
    from ffnkit.core.errors import InvalidArgumentError

    raise InvalidArgumentError(
        f"progress must be True, False or a callable taking a ProgressEvent, got {type(progress).__name__}"
    )


class Stage:
    """Report one stage by hand: ``advance()`` after each step, ``close()`` (or a ``with`` block) at the end.

    Example:
        >>> with Stage(print_event, "finercut", total=10, unit="trial") as stage:   # doctest: +SKIP
        ...     stage.advance(js=0.01)
    """

    def __init__(
        self, progress: ProgressLike, stage: str, total: int | None = None, unit: str = "step"
    ) -> None:
        self.listener = as_listener(progress)
        self.stage, self.total, self.unit = stage, total, unit
        self.done = 0
        self.closed = False
        self._emit(False)

    def _emit(self, end: bool, info: dict[str, Any] | None = None) -> None:
        if self.listener is not None:
            self.listener(ProgressEvent(self.stage, self.done, self.total, self.unit, end, dict(info or {})))

    def advance(self, n: int = 1, **info: Any) -> None:
        """``n`` more steps are done; ``info`` (numbers) travels with the event."""
        self.done += n
        self._emit(False, info)

    def close(self, **info: Any) -> None:
        """The stage is over (idempotent)."""
        if not self.closed:
            self.closed = True
            self._emit(True, info)

    def __enter__(self) -> Stage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def track(
    iterable: Iterable[T],
    progress: ProgressLike,
    stage: str,
    *,
    total: int | None = None,
    unit: str = "step",
) -> Iterator[T]:
    """Yield from ``iterable``, reporting one step per item to the ``progress`` listener.

    Example:
        >>> list(track([1, 2], False, "quiet"))
        [1, 2]
    """
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with Stage(progress, stage, total, unit) as s:
        for item in iterable:
            yield item
            s.advance()
