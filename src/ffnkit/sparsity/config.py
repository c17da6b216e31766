"""``SparsityConfig`` (how to sparsify) and the rule registry :data:`RULES` (name -> calibration function).

``sparsity`` is the share of FFN weight bytes a batch-1 decode step does not read (over W_in, W_gate,
W_out), the one measure every rule is calibrated to. What a rule can skip differs: TEAL skips input
columns of all three matrices; CATS, CHESS and statistical top-k always read the whole gate, so a gated
FFN skips at most 2/3 of its bytes with them; the predictor skips whole neurons but reads its own factors.

Example:
    >>> SparsityConfig("teal", sparsity=0.4).to_dict()["allocation"]
    'greedy'
    >>> RULES.names()[:3]
    ['best', 'teal', 'cats']
"""

from __future__ import annotations

from dataclasses import dataclass

from ffnkit.core.config import JsonConfig
from ffnkit.core.errors import InvalidArgumentError
from ffnkit.core.registry import Registry

__all__ = ["ALLOCATIONS", "RULES", "SparsityConfig", "register_rule"]

ALLOCATIONS = ("uniform", "greedy", "sensitivity")

# rule -> calibrate(ctx: ffnkit.sparsity.calibrate.Calibration, config) -> list[LayerPlan]
RULES: Registry = Registry("sparsity rule")


def register_rule(name: str, target: object, *, help: str = "", needs_gate: bool = False, mode: str) -> None:
    """Add a sparsity rule: ``target`` is ``calibrate(calibration, config) -> list[LayerPlan]`` or its
    ``"module:function"`` string; ``mode`` the :class:`~ffnkit.modules.sparse_ffn.SparseFFN` mode it sets.

    Example:
        >>> register_rule("teal", "ffnkit.sparsity.rules:calibrate_teal", mode="input", help="TEAL")
    """
    RULES.register(name, target, help=help, needs_gate=needs_gate, mode=mode)


register_rule(
    "best",
    "ffnkit.sparsity.rules:calibrate_best",
    mode="input",
    help="TEAL thresholds on weight-scaled inputs (|x_j|·‖W[:,j]‖), split over layers and sites by measured "
    "sensitivity, then a least-squares refit of W_out for the masks",
)
register_rule(
    "teal",
    "ffnkit.sparsity.rules:calibrate_teal",
    mode="input",
    help="TEAL: |x| thresholds at the inputs of gate/up and down, greedy split per layer (uniform over layers)",
)
register_rule(
    "cats",
    "ffnkit.sparsity.rules:calibrate_cats",
    mode="gate",
    needs_gate=True,
    help="CATS: zero neurons with |act(W_gate x)| below a per-layer threshold (gate always read)",
)
register_rule(
    "chess",
    "ffnkit.sparsity.rules:calibrate_chess",
    mode="gate",
    needs_gate=True,
    help="CHESS: channel-wise thresholds, keep |act(gate_i)|·E|up_i| above a per-layer τ",
)
register_rule(
    "stat-topk",
    "ffnkit.sparsity.rules:calibrate_stat_topk",
    mode="stat",
    help="Spark-style statistical top-k: keep |act(gate)| above mean + z·std of the token (no sort)",
)
register_rule(
    "predictor",
    "ffnkit.sparsity.predictor:calibrate_predictor",
    mode="predictor",
    help="Deja Vu: a low-rank predictor of active neurons trained on calibration activations (BCE)",
)


@dataclass
class SparsityConfig(JsonConfig):
    """How to sparsify. JSON round trip: ``SparsityConfig.from_dict(json.loads(c.to_json()))``.

    ``allocation``: ``uniform`` (every layer and site the same share), ``greedy`` (TEAL: per layer, split
    between the FFN's input and intermediate sites by least output error; every layer the same share),
    ``sensitivity`` (``best``: also across layers, weighted by each layer's measured effect on the logits).
    None picks the rule's own (best: sensitivity, teal: greedy, others: uniform).

    Example:
        >>> SparsityConfig("cats", sparsity=0.4).needs_gate
        True
    """

    rule: str = "best"
    sparsity: float = 0.4  # share of FFN weight bytes a decode step skips, [0, 1)
    allocation: str | None = None
    layers: list[int] | None = None  # FFN indices (None = all)
    samples: int = 16  # calibration windows
    seq_len: int = 256
    corpus: str = "shakespeare"
    seed: int = 0
    tokens: int = 4096  # calibration tokens kept per layer for thresholds
    path_tokens: int = 512  # tokens for the per-layer error paths (greedy / sensitivity)
    step: float = 0.05  # site-sparsity step of the greedy paths
    probe_windows: int = (
        8  # windows of the sensitivity probes (the H200 frontier's setting; 2 / 8 / 16 mixed on the CPU)
    )
    probe_tokens: int = 256  # tokens of each probe window
    predictor_rank: int = 64
    predictor_steps: int = 300
    # > 0: before the final calibration, distil the model to its dense self for this many minutes with the
    # sparsity in the loop (KL on logits, FFN weights train, masks straight-through), then re-calibrate.
    # This changes FFN weights (saved with the model); the result reports it.
    heal_minutes: float = 0.0
    heal_steps: int = 2000  # at most this many optimiser steps within heal_minutes
    heal_lr: float = 3e-4  # HealConfig's measured best for pruning heals (heal_sweep_h200.json)
    heal_samples: int = 1024  # heal windows of seq_len tokens drawn from corpus (with a tokenizer)
    # W_out refit (ffnkit.sparsity.refit): with the calibrated masks in place, each FFN's down projection is
    # refitted by least squares to the dense output on the calibration tokens, shrunk towards the dense
    # W_out by refit_ridge x the mean Gram diagonal. Changes FFN weights (saved with the model); the result
    # reports each layer's output error before and after. None: on for best, off for the published rules.
    refit: bool | None = None
    refit_ridge: float = 3.0
    version: int = 1

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise RULES.unknown(self.rule)
        s = self.sparsity
        if isinstance(s, bool) or not isinstance(s, int | float) or not 0.0 <= float(s) < 1.0:
            raise InvalidArgumentError(
                f"sparsity must be in [0, 1) (the share of FFN weight bytes skipped), got {s!r}"
            )
        self.sparsity = float(s)
        if self.mode in ("gate", "stat") and self.sparsity >= 2.0 / 3.0:
            raise InvalidArgumentError(
                f"rule {self.rule!r} reads the whole gate: it can skip at most 67% of the weight bytes of a "
                "gated FFN; choose --sparsity below 0.67, or rule teal or best"
            )
        if self.allocation is None:
            self.allocation = {"best": "sensitivity", "teal": "greedy"}.get(self.rule, "uniform")
        if self.allocation not in ALLOCATIONS:
            raise InvalidArgumentError(
                f"allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}"
            )
        if self.allocation != "uniform" and RULES.meta(self.rule, "mode") != "input":
            raise InvalidArgumentError(
                f"allocation {self.allocation!r} splits TEAL-style input/intermediate sites; rule "
                f"{self.rule!r} has one site: use allocation='uniform'"
            )
        for name in (
            "samples",
            "seq_len",
            "tokens",
            "path_tokens",
            "probe_windows",
            "probe_tokens",
            "predictor_rank",
            "heal_steps",
            "heal_samples",
        ):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise InvalidArgumentError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if isinstance(self.heal_minutes, bool) or not isinstance(self.heal_minutes, int | float):
            raise InvalidArgumentError(f"heal_minutes must be a number >= 0, got {self.heal_minutes!r}")
        if self.heal_minutes < 0 or not self.heal_lr > 0:
            raise InvalidArgumentError(
                f"heal_minutes must be >= 0 and heal_lr > 0, got {self.heal_minutes}, {self.heal_lr}"
            )
        if self.refit is None:
            self.refit = self.rule == "best"
        if not isinstance(self.refit, bool):
            raise InvalidArgumentError(f"refit must be true or false, got {self.refit!r}")
        r = self.refit_ridge
        if isinstance(r, bool) or not isinstance(r, int | float) or not float(r) > 0:
            raise InvalidArgumentError(f"refit_ridge must be a number > 0, got {r!r}")
        self.refit_ridge = float(r)
        if not 0.0 < float(self.step) <= 0.5:
            raise InvalidArgumentError(f"step must be in (0, 0.5], got {self.step}")
        if self.layers is not None:
            self.layers = list(self.layers)

    @property
    def needs_gate(self) -> bool:
        return bool(RULES.meta(self.rule, "needs_gate", False))

    @property
    def mode(self) -> str:
        return str(RULES.meta(self.rule, "mode"))
