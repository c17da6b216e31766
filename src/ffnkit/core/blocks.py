"""Blocks and sublayers: the topology of a single-stack (decoder-only) model around its FFNs.

- the **layer list**: the one ModuleList of blocks (found by the adapter's ``layers`` patterns);
- a :class:`Block`: one element of it that holds an FFN, with that FFN's handle and its attention
  sublayer (the adapter's ``attn`` path); a block whose FFN was removed (``ZeroFFN``) is no longer one;
- a :class:`Sublayer`: an attention or FFN sublayer, the unit that FinerCut zeroes and sublayer removal
  deletes; its ``module`` is where a zeroing hook goes (:func:`zero_output`).

Example:
    >>> [b.name for b in blocks(model)][:2]          # ['model.layers.0', 'model.layers.1']
    >>> [s.name for s in sublayers(model)][:2]       # ['layers.0.attn', 'layers.0.ffn']
    >>> num_blocks(model), attn_path(model), ffn_path(model)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ffnkit.core.archs import find_ffns, find_layer_lists, resolve_spec
from ffnkit.core.capture import site_hooks
from ffnkit.core.errors import InvalidArgumentError
from ffnkit.core.ffn import FFN

__all__ = [
    "Block",
    "Sublayer",
    "attn_path",
    "block_modules",
    "block_of",
    "blocks",
    "ffn_path",
    "has_submodule",
    "layer_list",
    "num_blocks",
    "parameter_count",
    "single_stack",
    "sublayers",
    "zero_output",
]


@dataclass(eq=False)
class Block:
    """One transformer block: its module path, the FFN handle inside it, and its attention sublayer."""

    layer: int
    name: str
    module: nn.Module
    ffn: FFN
    attn_name: str | None
    attn: nn.Module | None


@dataclass(eq=False)
class Sublayer:
    """A removable sublayer: ``kind`` is "attn" or "ffn"; ``name`` like "layers.3.ffn".

    Example:
        >>> sublayers(model)[1].to_dict()    # {'layer': 0, 'kind': 'ffn', 'name': 'layers.0.ffn', 'module': ...}
    """

    layer: int
    kind: str
    name: str
    module: nn.Module  # where the zeroing hook goes
    path: str  # the module's path in the model

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: layer, kind, name and the module path."""
        return {"layer": self.layer, "kind": self.kind, "name": self.name, "module": self.path}


def has_submodule(root: nn.Module, path: str) -> bool:
    """Whether ``root.get_submodule(path)`` exists ("" is ``root`` itself).

    Example:
        >>> has_submodule(block, "mlp.down_proj")
        True
    """
    try:
        root.get_submodule(path)
        return True
    except AttributeError:
        return False


def parameter_count(module: nn.Module) -> int:
    """Elements of every parameter of ``module`` (shared parameters once, as ``parameters()`` gives them).

    Example:
        >>> parameter_count(nn.Linear(4, 3))
        15
    """
    return sum(p.numel() for p in module.parameters())


def single_stack(model: nn.Module, what: str) -> list[FFN]:
    """The FFN handles of a single-stack model; a one-line error for encoder-decoders (two stacks).

    Example:
        >>> len(single_stack(model, "FinerCut"))     # one per block
    """
    ffns = find_ffns(model)
    if getattr(model.config, "is_encoder_decoder", False) or len({f.stack for f in ffns}) > 1:
        raise InvalidArgumentError(
            f"{what} needs a single stack of blocks (a decoder-only model); "
            f"this {model.config.model_type!r} model is an encoder-decoder — use a decoder model"
        )
    return ffns


def layer_list(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """(owner module, attribute name, ModuleList) of the model's single stack of blocks.

    Example:
        >>> owner, attr, mlist = layer_list(model)    # (model.model, 'layers', ModuleList)
    """
    found = find_layer_lists(model, resolve_spec(model))
    if len(found) != 1:
        raise InvalidArgumentError(
            "this needs a single stack of blocks (a decoder-only model); "
            f"found {len(found)} stacks in this {model.config.model_type!r} model"
        )
    _, path, mlist = found[0]
    owner_path, _, attr = path.rpartition(".")
    return model.get_submodule(owner_path) if owner_path else model, attr, mlist


def block_modules(model: nn.Module) -> list[nn.Module]:
    """Every block of the single stack, in order (including blocks whose FFN was removed).

    Example:
        >>> len(block_modules(model)) == model.config.num_hidden_layers
        True
    """
    return list(layer_list(model)[2])


def num_blocks(model: nn.Module) -> int:
    """How many blocks the single stack holds.

    Example:
        >>> num_blocks(model)
        30
    """
    return len(layer_list(model)[2])


def attn_path(model: nn.Module) -> str:
    """The attention sublayer's path inside a block (the adapter's ``attn``); an error if none is known.

    Example:
        >>> attn_path(model)
        'self_attn'
    """
    attn = resolve_spec(model).attn
    if not attn:
        raise InvalidArgumentError(
            f"no attention path known for {model.config.model_type!r}; pass an ArchSpec with `attn`"
        )
    return attn


def ffn_path(model: nn.Module) -> str:
    """The FFN container's path inside a block; "" (OPT, BERT: the FFN is the block itself) is refused,
    since such an FFN cannot be removed apart from its block.

    Example:
        >>> ffn_path(model)
        'mlp'
    """
    spec = resolve_spec(model)
    block0 = block_modules(model)[0]
    for p in spec.ffn:
        if p and has_submodule(block0, p):
            return p
    raise InvalidArgumentError(
        f"{model.config.model_type!r} keeps its FFN inside the block (no FFN module of its own), so an FFN "
        "sublayer cannot be removed alone; remove whole blocks (method 'shortgpt', kind 'all') instead"
    )


def block_of(model: nn.Module, ffn: FFN) -> tuple[str, nn.Module]:
    """(path, module) of the block that holds ``ffn``: its parent, or the FFN container itself (OPT, BERT).

    Example:
        >>> block_of(model, find_ffns(model)[3])[0]
        'model.layers.3'
    """
    name = ffn.name
    for path in resolve_spec(model).ffn:
        if path == "":
            break
        if name.endswith("." + path):
            name = name[: -len(path) - 1]
            break
    return name, model.get_submodule(name)


def blocks(model: nn.Module) -> list[Block]:
    """Every block of a single-stack model that holds an FFN, from its FFN handles.

    Example:
        >>> [b.name for b in blocks(model)][:2]       # ['model.layers.0', 'model.layers.1']
    """
    spec = resolve_spec(model)
    out = []
    for ffn in single_stack(model, "this analysis"):
        name, module = block_of(model, ffn)
        attn = None
        if spec.attn and has_submodule(module, spec.attn):
            attn = module.get_submodule(spec.attn)
        attn_name = f"{name}.{spec.attn}" if attn is not None else None
        out.append(Block(ffn.layer, name, module, ffn, attn_name, attn))
    return out


def sublayers(model: nn.Module) -> list[Sublayer]:
    """FinerCut's candidates in execution order: attention then FFN of each block.

    FFN sublayers hook the module of the ``out`` site (``ffnkit.core.capture``; the whole MoE block for
    MoE layers), attention sublayers the adapter's ``attn`` module.

    Example:
        >>> [s.name for s in sublayers(model)][:2]    # ['layers.0.attn', 'layers.0.ffn']
    """
    cands = []
    for b in blocks(model):
        if b.attn is None:
            raise InvalidArgumentError(
                f"no attention sublayer at {b.name}.{resolve_spec(model).attn}; "
                "pass an ArchSpec with the right `attn` path"
            )
        cands.append(Sublayer(b.layer, "attn", f"layers.{b.layer}.attn", b.attn, b.attn_name))
        module, _, _ = site_hooks(b.ffn, "out")  # "out" is a forward-output site on every kind
        path = next(n for n, m in model.named_modules() if m is module)
        cands.append(Sublayer(b.layer, "ffn", f"layers.{b.layer}.ffn", module, path))
    return cands


def zero_output(module: nn.Module, args: Any, out: Any) -> Any:
    """A forward hook that returns zeros in place of a module's main output, keeping its structure
    (tuples keep their extras; a ModelOutput has its first field zeroed).

    Example:
        >>> handle = sublayers(model)[0].module.register_forward_hook(zero_output)
    """
    if isinstance(out, Tensor):
        return torch.zeros_like(out)
    if isinstance(out, tuple):
        return (torch.zeros_like(out[0]), *out[1:])
    if hasattr(out, "to_tuple"):  # a ModelOutput: zero its first field
        key = next(iter(out.keys()))
        out[key] = torch.zeros_like(out[key])
        return out
    raise InvalidArgumentError(f"cannot zero an output of type {type(out).__name__}")
