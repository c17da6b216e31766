"""The compression methods: name → config class, run function, fixed config fields, one-line help.

Every ``ffnkit compress --method`` and every step of :func:`ffnkit.pipeline.run_pipeline` is one entry of
:data:`METHODS`. A method is a config dataclass (JSON round trip, :class:`~ffnkit.core.config.JsonConfig`)
and a run function ``run(model, config, *, tokenizer=None, progress=False, **inputs) -> report`` (a
report has ``to_dict()``; ``inputs`` are precomputed statistics the transform accepts, such as
``calibration=`` or ``stats=``). ``fixed`` fields are set by the method and may not be changed
(``flap`` is ``PruneConfig(method="flap")``); ``defaults`` apply when the user gives neither the field
nor another field of ``one_of`` (low rank: ``ratio=0.3`` unless ``rank`` is given).

Every pruning score of :data:`~ffnkit.compress.score_functions.SCORES` is a method here (also one
registered later). Config classes and run functions are ``"module:attr"`` strings, imported when a
method is built or run, so listing the methods (``ffnkit --help``) loads no torch.

Adding a method is one call::

    register_method("svd", "ffnkit.compress.lowrank:LowRankConfig", "ffnkit.compress.lowrank:lowrank_",
                    fixed={"method": "svd"}, defaults={"ratio": 0.3}, one_of=("ratio", "rank"),
                    help="low rank: truncated SVD of each FFN matrix (data-free)")

Example:
    >>> config = METHODS.get("svd-llm").build({"ratio": 0.4, "allocation": "global"})
    >>> config.method, config.allocation
    ('svd-llm', 'global')
    >>> report = METHODS.get("svd-llm").run(model, config, tokenizer=tok)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from typing import Any

from ffnkit.compress.score_functions import SCORES
from ffnkit.core.errors import InvalidArgumentError
from ffnkit.core.registry import Entry, Registry

__all__ = ["METHODS", "Method", "methods_with_field", "register_method"]

_NOT_SETTINGS = ("version",)  # config fields that describe the format, not the method


def _load(target: Any) -> Any:
    """A "module:attr" string imported now (anything else as is)."""
    return Entry("", target).resolve() if isinstance(target, str) else target


@dataclass(frozen=True)
class Method:
    """One compression method: how to build its config and how to run it.

    Example:
        >>> m = METHODS.get("flap")
        >>> m.build({"ratio": 0.2}).method, "allocation" in m.fields()
        ('flap', True)
    """

    name: str
    config: type | str  # the config dataclass, or "module:Class"
    run: Callable[..., Any] | str  # run(model, config, *, tokenizer=None, progress=False, **inputs)
    fixed: Mapping[str, Any] | str = field(default_factory=dict)  # or "module:DICT" (e.g. prune's BEST)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    one_of: tuple[str, ...] = ()  # fields of which the user gives at most one (a default among them yields)

    def config_class(self) -> type:
        """The config dataclass (imported now)."""
        return _load(self.config)

    def run_function(self) -> Callable[..., Any]:
        """The run function (imported now)."""
        return _load(self.run)

    def fixed_fields(self) -> dict[str, Any]:
        """The config fields this method sets itself."""
        return dict(_load(self.fixed))

    def fields(self) -> list[str]:
        """The config fields a user may set (all but the fixed ones and ``version``)."""
        fixed = self.fixed_fields()
        return [
            f.name
            for f in dataclass_fields(self.config_class())
            if f.name not in fixed and f.name not in _NOT_SETTINGS
        ]

    def build(self, given: Mapping[str, Any] | None = None) -> Any:
        """The config from the fields the user gave: defaults, then ``given``, then the fixed fields.

        A field the config lacks, or a fixed field given another value, is a one-line error.

        Example:
            >>> METHODS.get("best").build({"ratio": 0.4}).allocation
            'sensitivity'
        """
        given = dict(given or {})
        fixed = self.fixed_fields()
        settable = self.fields()
        unknown = [k for k in given if k not in settable and k not in fixed]
        if unknown:
            raise InvalidArgumentError(
                f"method {self.name!r} has no setting {', '.join(map(repr, unknown))}; "
                f"its settings: {', '.join(settable)}"
            )
        clash = [k for k in given if k in fixed and given[k] != fixed[k]]
        if clash:
            pairs = ", ".join(f"{k}={fixed[k]!r}" for k in clash)
            raise InvalidArgumentError(
                f"method {self.name!r} fixes {pairs}; choose another method to change it"
            )
        chosen = set(self.one_of) & set(given)
        defaults = {
            k: v for k, v in self.defaults.items() if k not in given and not (k in self.one_of and chosen)
        }
        return self.config_class().from_dict({**defaults, **given, **fixed})

    def __call__(
        self, model: Any, config: Any, *, tokenizer: Any = None, progress: bool = False, **inputs: Any
    ) -> Any:
        """Run the method on ``model`` (in place) with a config from :meth:`build`; its report.

        Example:
            >>> report = METHODS.get("flap")(model, METHODS.get("flap").build({"ratio": 0.3}), tokenizer=tok)
        """
        if not isinstance(config, self.config_class()):
            raise InvalidArgumentError(
                f"method {self.name!r} takes a {self.config_class().__name__}, got {type(config).__name__}"
            )
        wrong = {k: v for k, v in self.fixed_fields().items() if getattr(config, k) != v}
        if wrong:  # e.g. a PruneConfig("wanda-sp") given to method "flap"
            pairs = ", ".join(f"{k}={v!r}" for k, v in wrong.items())
            raise InvalidArgumentError(f"method {self.name!r} needs {pairs}; build its config with .build()")
        return self.run_function()(model, config, tokenizer=tokenizer, progress=progress, **inputs)


METHODS: Registry[Method] = Registry("compression method")


def register_method(
    name: str,
    config: type | str,
    run: Callable[..., Any] | str,
    *,
    fixed: Mapping[str, Any] | str | None = None,
    defaults: Mapping[str, Any] | None = None,
    one_of: tuple[str, ...] = (),
    help: str = "",
) -> Method:
    """Add (or replace) a compression method of ``ffnkit compress`` and of the pipeline.

    Example:
        >>> register_method("flap-global", "ffnkit.compress.prune:PruneConfig", "ffnkit.compress.prune:prune_",
        ...                 fixed={"method": "flap", "allocation": "global"}, help="FLAP, one global threshold")
    """
    method = Method(name, config, run, fixed or {}, dict(defaults or {}), tuple(one_of))
    METHODS.register(name, method, help=help)
    return method


def methods_with_field(name: str) -> list[str]:
    """The methods whose config has a settable field ``name`` (imports every method's config class).

    Example:
        >>> methods_with_field("bits")
        ['quantize']
    """
    return [m for m, method in METHODS.items() if name in method.fields()]


# ----- the built-in methods -----------------------------------------------------------------------
_PRUNE = ("ffnkit.compress.prune:PruneConfig", "ffnkit.compress.prune:prune_")
register_method(
    "best",
    *_PRUNE,
    fixed="ffnkit.compress.prune:BEST",
    defaults={"align": 32},  # widths in whole blocks of llama.cpp's Q8_0/Q4_0 (benchmarks/export_align.py)
    help="the published frontier's best: FLAP scores, per-layer sensitivity, least-squares W_out refit",
)


def _score_method(score: Entry) -> None:
    register_method(score.name, *_PRUNE, fixed={"method": score.name}, help=f"neuron pruning: {score.help}")


SCORES.listen(_score_method)  # every pruning score is a method, also one registered later

_LOWRANK = ("ffnkit.compress.lowrank:LowRankConfig", "ffnkit.compress.lowrank:lowrank_")
for _name, _help in {
    "svd": "low rank: truncated SVD of each FFN matrix (data-free)",
    "asvd": "low rank: activation-aware SVD, S = diag(mean|x|)^0.5 (ASVD)",
    "svd-llm": "low rank: SVD whitened by chol(E[xxᵀ]) of calibration inputs (SVD-LLM)",
}.items():
    register_method(
        _name,
        *_LOWRANK,
        fixed={"method": _name},
        defaults={"ratio": 0.3},
        one_of=("ratio", "rank"),
        help=_help,
    )

_SUBLAYERS = ("ffnkit.compress.sublayers:SublayerConfig", "ffnkit.compress.sublayers:remove_sublayers_")
register_method(
    "finercut",
    *_SUBLAYERS,
    fixed={"method": "finercut", "kind": "ffn", "remove": None},
    defaults={"ratio": 0.3},
    one_of=("ratio", "count"),
    help="remove the FFN sublayers FinerCut's greedy order picks (ratio: share of FFN parameters)",
)
register_method(
    "shortgpt",
    *_SUBLAYERS,
    fixed={"method": "shortgpt", "remove": None},
    defaults={"ratio": 0.3},
    one_of=("ratio", "count"),
    help="delete round(ratio·L) blocks of lowest block influence (ShortGPT)",
)
register_method(
    "fuse",
    "ffnkit.compress.methods:FuseShareConfig",
    "ffnkit.compress.methods:fuse_share_",
    help="fuse round(ratio·#FFNs) low-dependency runs of FFNs into wider parallel FFNs",
)
register_method(
    "nest",
    "ffnkit.compress.methods:NestSliceConfig",
    "ffnkit.compress.methods:nest_slice_",
    help="sort neurons by importance, keep the first (1-ratio) per layer",
)
register_method(
    "quantize",
    "ffnkit.compress.quantize:QuantizeConfig",
    "ffnkit.compress.methods:quantize_fitting_",
    help="weight-only FFN quantisation (torchao integers, packed; saves and reloads exactly; default 4 bits)",
)

# dense -> mixture of experts (ffnkit.moe): pipeline steps and `ffnkit compress --method` like the others
register_method(
    "moefy",
    "ffnkit.moe.convert:MoEfyConfig",
    "ffnkit.moe.convert:moefy_",
    help="dense -> MoE: split each FFN into experts, route the top-k per token (active: share of neurons)",
)
register_method(
    "upcycle",
    "ffnkit.moe.upcycle:UpcycleConfig",
    "ffnkit.moe.upcycle:upcycle_",
    help="MoE upcycling: every expert a copy (or a slice, --granular) of the dense FFN, a new router",
)
