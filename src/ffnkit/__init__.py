"""ffnkit: open up the feed-forward (FFN/MLP) blocks of Transformer models.

Public names are imported lazily so that ``import ffnkit`` stays fast and touches no accelerator.
"""

from __future__ import annotations

from ffnkit.core.lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    # models and data
    "load_model": "ffnkit.sources.models",
    "builtin_models": "ffnkit.sources.models",
    "load_corpus": "ffnkit.data",
    "Corpus": "ffnkit.data",
    "evaluation_tokens": "ffnkit.data",
    "calibration_batches": "ffnkit.data",
    # the FFN handle and the adapter table
    "FFN": "ffnkit.core.ffn",
    "find_ffns": "ffnkit.core.archs",
    "select_ffns": "ffnkit.core.archs",
    "ArchSpec": "ffnkit.core.archs",
    "register_arch": "ffnkit.core.archs",
    "SUPPORTED_FAMILIES": "ffnkit.core.archs",
    # capture
    "capture": "ffnkit.core.capture",
    "SITES": "ffnkit.core.capture",
    "make_reducer": "ffnkit.core.reducers",
    # evaluation
    "perplexity": "ffnkit.evaluate",
    "agreement": "ffnkit.evaluate",
    "decode_speed": "ffnkit.evaluate",
    "peak_memory": "ffnkit.evaluate",
    "count_parameters": "ffnkit.evaluate",
    # inspect and steer
    "project_neurons": "ffnkit.inspect.vocab",
    "search_neurons": "ffnkit.inspect.vocab",
    "trace": "ffnkit.inspect.tracing",
    "steer": "ffnkit.steering",
    "NeuronEdit": "ffnkit.steering",
    "ExpertEdit": "ffnkit.steering",
    # compress, save and load
    "save": "ffnkit.io",
    "load": "ffnkit.io",
    "check_output_dir": "ffnkit.folders",
    "prune_": "ffnkit.compress.prune",
    "PruneConfig": "ffnkit.compress.prune",
    "lowrank_": "ffnkit.compress.lowrank",
    "LowRankConfig": "ffnkit.compress.lowrank",
    "quantize_": "ffnkit.compress.quantize",
    "QuantizeConfig": "ffnkit.compress.quantize",
    "heal_": "ffnkit.train.heal",
    "HealConfig": "ffnkit.train.heal",
    "remove_sublayers_": "ffnkit.compress.sublayers",
    "SublayerConfig": "ffnkit.compress.sublayers",
    "fuse_ffns_": "ffnkit.compress.fusion",
    "FusionConfig": "ffnkit.compress.fusion",
    "nest_": "ffnkit.compress.nest",
    "NestConfig": "ffnkit.compress.nest",
    "slice_widths_": "ffnkit.compress.nest",
    # fast experts (MoE execution)
    "experts_forward": "ffnkit.kernels.moe",
    "use_fast_experts": "ffnkit.kernels.moe_hf",
    # mixture of experts
    "moefy_": "ffnkit.moe.convert",
    "MoEfyConfig": "ffnkit.moe.convert",
    "upcycle_": "ffnkit.moe.upcycle",
    "UpcycleConfig": "ffnkit.moe.upcycle",
    # activation sparsity
    "sparsify_": "ffnkit.sparsity.transform",
    "SparsityConfig": "ffnkit.sparsity.config",
    "measure_sparsity": "ffnkit.sparsity.transform",
    # the experiment pipeline
    "run_pipeline": "ffnkit.pipeline",
    "PipelineConfig": "ffnkit.pipeline",
    "Step": "ffnkit.pipeline",
    # errors
    "FFNKitError": "ffnkit.core.errors",
    "UnknownModelError": "ffnkit.core.errors",
    "UnsupportedArchitectureError": "ffnkit.core.errors",
    "LayerIndexError": "ffnkit.core.errors",
    "CorpusError": "ffnkit.core.errors",
    "FetchError": "ffnkit.core.errors",
    "InvalidArgumentError": "ffnkit.core.errors",
    "SavedModelError": "ffnkit.core.errors",
    "OutputFolderError": "ffnkit.core.errors",
    "RemoteCodeError": "ffnkit.core.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
