"""Streaming statistics whose memory does not grow with the number of tokens.

Every reducer takes activations ``x`` of shape ``[..., n]`` (all leading dims are flattened into
tokens), accumulates in float64 on ``x``'s device whatever the model dtype, and returns its result on
the CPU. ``merge`` combines two reducers of the same kind and settings (e.g. from shards), so that
``a.update(x1); b.update(x2); a.merge(b)`` equals one pass over ``cat([x1, x2])``.

Variances and covariances are *population* statistics (ddof=0): divided by the token count N, not N-1.

Example:
    >>> r = Variance()
    >>> for chunk in torch.randn(3, 100, 8).unbind(0):
    ...     r.update(chunk)
    >>> r.result().var.shape
    torch.Size([8])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ffnkit.core.criteria import ACTIVE_THRESHOLD, active
from ffnkit.core.errors import InvalidArgumentError
from ffnkit.core.registry import Registry

__all__ = [
    "REDUCERS",
    "Count",
    "Covariance",
    "CovarianceResult",
    "FiringRate",
    "Histogram",
    "HistogramResult",
    "Max",
    "Mean",
    "MeanAbs",
    "MeanSquare",
    "Min",
    "Reducer",
    "Variance",
    "VarianceResult",
    "make_reducer",
]


class Reducer:
    """Base class. A subclass says how to summarise one batch ``[N, n]`` and how to combine two summaries.

    Update and merge share one code path: a batch is summarised, then merged like a shard.
    """

    name: ClassVar[str] = "reducer"

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        self.count = 0  # tokens seen
        self.n: int | None = None  # width of the last dim, fixed by the first update
        self._state: dict[str, Tensor] = {}

    # --- what subclasses define -------------------------------------------------------------------
    def _config(self) -> tuple:
        return ()

    def _summarise(self, x: Tensor) -> dict[str, Tensor]:  # x: [N, n] float64
        raise NotImplementedError

    def _combine(self, a: dict[str, Tensor], na: int, b: dict[str, Tensor], nb: int) -> dict[str, Tensor]:
        return {k: a[k] + b[k] for k in a}  # default: running sums

    def result(self) -> Any:
        """The statistic over every token seen, on the CPU."""
        raise NotImplementedError

    # --- shared machinery -------------------------------------------------------------------------
    def update(self, x: Tensor) -> Reducer:
        """Add a batch of activations ``x`` [..., n]; returns self."""
        if x.dim() == 0:
            raise InvalidArgumentError(f"{type(self).__name__}.update needs a tensor [..., n], got a scalar")
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)  # [N, n]; float64 keeps sums exact-ish
        if x.shape[0] == 0:
            return self
        self._absorb(x.shape[0], x.shape[1], self._summarise(x))
        return self

    def merge(self, other: Reducer) -> Reducer:
        """Fold ``other`` (same class and settings) into self, as if self had seen its tokens; returns self."""
        if type(other) is not type(self) or other._config() != self._config():
            raise InvalidArgumentError(
                f"cannot merge {type(other).__name__}{other._config()} into {type(self).__name__}"
                f"{self._config()}: merge reducers of the same kind and settings"
            )
        if other.count:
            device = next(iter(self._state.values())).device if self._state else None
            state = {k: v.to(device) if device is not None else v.clone() for k, v in other._state.items()}
            self._absorb(other.count, other.n, state)
        return self

    def _absorb(self, count: int, n: int | None, state: dict[str, Tensor]) -> None:
        if self.n is not None and n != self.n:
            raise InvalidArgumentError(
                f"{type(self).__name__} saw width {self.n} before, now {n}: use one reducer per site"
            )
        self.n = n
        self._state = state if not self.count else self._combine(self._state, self.count, state, count)
        self.count += count

    def _need_data(self) -> None:
        if not self.count:
            raise InvalidArgumentError(f"{type(self).__name__} has seen no tokens: call update(x) first")

    def state_numel(self) -> int:
        """Number of elements held in the state; independent of the number of tokens seen."""
        return sum(t.numel() for t in self._state.values())

    def __repr__(self) -> str:
        return f"{type(self).__name__}{self._config()}(count={self.count}, n={self.n})"


class Count(Reducer):
    """Number of tokens seen. ``result()`` -> int."""

    name = "count"

    def _summarise(self, x: Tensor) -> dict[str, Tensor]:
        return {}

    def result(self) -> int:
        return self.count


class _MeanOf(Reducer):
    """Mean over tokens of ``f(x)`` per neuron; ``result()`` -> [n] float64."""

    def _f(self, x: Tensor) -> Tensor:
        return x

    def _summarise(self, x: Tensor) -> dict[str, Tensor]:
        return {"sum": self._f(x).sum(0)}  # [n]

    def result(self) -> Tensor:
        self._need_data()
        return (self._state["sum"] / self.count).cpu()  # [n]


class Mean(_MeanOf):
    """Mean per neuron, E[x]."""

    name = "mean"


class MeanAbs(_MeanOf):
    """Mean absolute value per neuron, E[|x|]."""

    name = "mean_abs"

    def _f(self, x: Tensor) -> Tensor:
        return x.abs()


class MeanSquare(_MeanOf):
    """Mean square per neuron, E[x²] (what activation-aware pruning scores need)."""

    name = "mean_sq"

    def _f(self, x: Tensor) -> Tensor:
        return x * x


class FiringRate(_MeanOf):
    """Share of tokens on which each neuron is active, under ffnkit's one definition
    (:mod:`ffnkit.core.criteria`: |x_i| > threshold · mean_j |x_j| on the token), per neuron.

    Example:
        >>> FiringRate().update(torch.tensor([[4.0, -2.0, 0.1, 0.0]])).result()
        tensor([1., 1., 0., 0.], dtype=torch.float64)
    """

    name = "firing_rate"

    def __init__(self, threshold: float = ACTIVE_THRESHOLD) -> None:
        self.threshold = float(threshold)
        super().__init__()

    def _config(self) -> tuple:
        return (self.threshold,)

    def _f(self, x: Tensor) -> Tensor:  # x [N, n]
        return active(x, self.threshold).to(torch.float64)


@dataclass
class VarianceResult:
    """Per-neuron mean, population variance (ddof=0) and standard deviation, all [n] float64."""

    mean: Tensor
    var: Tensor
    std: Tensor
    count: int


class Variance(Reducer):
    """Mean and population variance (ddof=0) per neuron, by Chan et al.'s batched merge of (N, mean, M2)."""

    name = "var"

    def _summarise(self, x: Tensor) -> dict[str, Tensor]:
        mean = x.mean(0)  # [n]
        return {"mean": mean, "m2": ((x - mean) ** 2).sum(0)}  # centred per batch: no cancellation

    def _combine(self, a: dict[str, Tensor], na: int, b: dict[str, Tensor], nb: int) -> dict[str, Tensor]:
        delta, n = b["mean"] - a["mean"], na + nb
        return {"mean": a["mean"] + delta * (nb / n), "m2": a["m2"] + b["m2"] + delta**2 * (na * nb / n)}

    def result(self) -> VarianceResult:
        self._need_data()
        var = (self._state["m2"] / self.count).cpu()
        return VarianceResult(self._state["mean"].cpu(), var, var.sqrt(), self.count)


@dataclass
class CovarianceResult:
    """Mean [n] and population covariance (ddof=0) [n, n], float64."""

    mean: Tensor
    cov: Tensor
    count: int

    def eigvalsh(self) -> Tensor:
        """Eigenvalues of the covariance, ascending, float64 [n]."""
        return torch.linalg.eigvalsh(self.cov)


class Covariance(Reducer):
    """Mean and covariance (n×n) by the batched merge of (N, mean, co-moment); state is O(n²)."""

    name = "cov"

    def _summarise(self, x: Tensor) -> dict[str, Tensor]:
        mean = x.mean(0)  # [n]
        xc = x - mean  # [N, n]
        return {"mean": mean, "c": xc.T @ xc}  # [n], [n, n]

    def _combine(self, a: dict[str, Tensor], na: int, b: dict[str, Tensor], nb: int) -> dict[str, Tensor]:
        delta, n = b["mean"] - a["mean"], na + nb
        return {
            "mean": a["mean"] + delta * (nb / n),
            "c": a["c"] + b["c"] + torch.outer(delta, delta) * (na * nb / n),
        }

    def result(self) -> CovarianceResult:
        self._need_data()
        return CovarianceResult(self._state["mean"].cpu(), (self._state["c"] / self.count).cpu(), self.count)

    def eigvalsh(self) -> Tensor:
        """Eigenvalues of the covariance seen so far, ascending, float64 [n]."""
        return self.result().eigvalsh()


class Max(Reducer):
    """Largest value per neuron, [n]."""

    name = "max"

    def _summarise(self, x: Tensor) -> dict[str, Tensor]:
        return {"v": x.amax(0)}

    def _combine(self, a: dict[str, Tensor], na: int, b: dict[str, Tensor], nb: int) -> dict[str, Tensor]:
        return {"v": torch.maximum(a["v"], b["v"])}

    def result(self) -> Tensor:
        self._need_data()
        return self._state["v"].cpu()


class Min(Max):
    """Smallest value per neuron, [n]."""

    name = "min"

    def _summarise(self, x: Tensor) -> dict[str, Tensor]:
        return {"v": x.amin(0)}

    def _combine(self, a: dict[str, Tensor], na: int, b: dict[str, Tensor], nb: int) -> dict[str, Tensor]:
        return {"v": torch.minimum(a["v"], b["v"])}


@dataclass
class HistogramResult:
    """Counts per bin ([bins], or [n, bins] per neuron), the ``bins + 1`` edges, and how many values fell
    below ``lo`` / above ``hi`` (those are also counted in the first / last bin)."""

    edges: Tensor
    counts: Tensor
    underflow: Tensor
    overflow: Tensor
    count: int


class Histogram(Reducer):
    """Fixed-edge histogram over ``range=(lo, hi)`` with ``bins`` equal bins.

    Values outside the range clamp into the end bins and are also counted as underflow / overflow.
    Without ``per_neuron`` all values are pooled: the counts sum to tokens × n. With ``per_neuron``
    the counts are [n, bins] and each row sums to the token count. Counts are exact int64.
    """

    name = "hist"

    def __init__(self, bins: int = 64, range: tuple[float, float] = (-10.0, 10.0), per_neuron: bool = False):
        lo, hi = float(range[0]), float(range[1])
        if bins < 1 or not lo < hi:
            raise InvalidArgumentError(
                f"Histogram needs bins >= 1 and lo < hi, got bins={bins}, range={range}"
            )
        self.bins, self.range, self.per_neuron = int(bins), (lo, hi), bool(per_neuron)
        self.edges = torch.linspace(lo, hi, self.bins + 1, dtype=torch.float64)  # [bins + 1]
        super().__init__()

    def _config(self) -> tuple:
        return (self.bins, self.range, self.per_neuron)

    def _summarise(self, x: Tensor) -> dict[str, Tensor]:
        # bucketize on the inner edges: below edges[1] -> bin 0, at or above edges[-2] -> last bin (clamped)
        idx = torch.bucketize(x, self.edges[1:-1].to(x.device), right=True)  # [N, n] int64
        under, over = (x < self.range[0]).sum(0), (x > self.range[1]).sum(0)  # [n]
        if self.per_neuron:
            flat = (
                idx + torch.arange(x.shape[1], device=x.device) * self.bins
            )  # [N, n]: one bin row per neuron
            counts = torch.bincount(flat.flatten(), minlength=x.shape[1] * self.bins).view(
                x.shape[1], self.bins
            )
            return {"counts": counts, "under": under, "over": over}
        return {
            "counts": torch.bincount(idx.flatten(), minlength=self.bins),
            "under": under.sum(),
            "over": over.sum(),
        }

    def result(self) -> HistogramResult:
        self._need_data()
        s = {k: v.cpu() for k, v in self._state.items()}
        return HistogramResult(self.edges.clone(), s["counts"], s["under"], s["over"], self.count)


# name -> Reducer class (its default settings); register your own with REDUCERS.register(name, cls)
REDUCERS: Registry[type[Reducer]] = Registry("reducer", hint="or pass a Reducer instance")
for _cls in (Count, Mean, Variance, MeanAbs, MeanSquare, FiringRate, Histogram, Covariance, Max, Min):
    REDUCERS.register(_cls.name, _cls, help=(_cls.__doc__ or "").strip().split("\n")[0])


def make_reducer(spec: str | Reducer) -> Reducer:
    """A reducer from its name in ``REDUCERS`` (default settings) or an instance (returned as is).

    Example:
        >>> make_reducer("var").update(torch.randn(10, 4)).result().std.shape
        torch.Size([4])
    """
    if isinstance(spec, Reducer):
        return spec
    return REDUCERS.get(spec)()
