"""tempo_ds.initialize: deepspeed.initialize that also honours `"tempo"` in ds_config.

    engine, optimizer, loader, scheduler = tempo_ds.initialize(model=model, config="ds.json", ...)

With "tempo" false or absent the call is deepspeed.initialize with the same arguments, untouched,
after one thing every call does first: DeepSpeed's own shared-memory op (CPU accelerator) is
loaded, and built with a progress message when it is not cached, instead of minutes of silence
inside deepspeed.initialize.
With it on, before DeepSpeed sees the model: the "tempo" entry is validated once (a mistake fails
here, not silently), the ops are built or found prebuilt, the stock modules are swapped for Tempo
ones keeping their parameters (tempo_ds.deepspeed.apply.swap_model, whose report is logged on rank
0), and the "tempo" key is removed from the config handed to DeepSpeed. A caller that parsed
"tempo" already hands the TempoConfig down with the keyword `tempo=`. For a Megatron-core model
(parallel state initialized) DeepSpeed's activation checkpointing is made to compose with it:
compose_activation_checkpointing, docs/activation_checkpointing.md.
"""
import copy
import logging
import sys

import deepspeed
from deepspeed.accelerator import get_accelerator
from deepspeed.constants import TORCH_DISTRIBUTED_DEFAULT_PORT

from ..op_builder import build_deepspeed_shm_op
from .apply import prepare_ops, swap_model
from .config import TempoConfig, TempoConfigError, load_ds_config, split_config, tempo_entry

logger = logging.getLogger("tempo_ds")


def read_tempo_config(args=None, config=None, config_params=None):
    """The TempoConfig that deepspeed.initialize's config arguments carry, found as DeepSpeed finds
    the config: config (or config_params), else args.deepspeed_config (or args.deepscale_config)."""
    source = _config_source(args, config, config_params)
    ds_config = load_ds_config(source)
    if ds_config is None:
        return TempoConfig.disabled()
    return tempo_entry(ds_config)


_ARGS_CONFIG_FIELDS = ("deepspeed_config", "deepscale_config")  # the second: DeepSpeed's deprecated name


def _config_source(args, config, config_params):
    """The one config deepspeed.initialize would read; a config given twice raises, as DeepSpeed
    refuses it (here before any module is swapped, and whether or not Tempo is on)."""
    if config is None:
        config = config_params
    given = {name: getattr(args, name, None) for name in _ARGS_CONFIG_FIELDS}
    in_args = [name for name, value in given.items() if value is not None]
    if len(in_args) > 1:
        raise ValueError("tempo_ds.initialize: args.deepspeed_config and args.deepscale_config are both "
                         "set; DeepSpeed refuses this too, pass one")
    if in_args:
        if config is not None:
            raise ValueError(f"tempo_ds.initialize: a DeepSpeed config was given both as args.{in_args[0]} "
                             "and as config=/config_params=; DeepSpeed refuses this too, pass one")
        config = given[in_args[0]]
    return config


def _tensor_parallel_size(mpu):
    if mpu is not None and hasattr(mpu, "get_tensor_model_parallel_world_size"):
        return mpu.get_tensor_model_parallel_world_size()
    try:
        from megatron.core import parallel_state
    except ImportError:
        return 1
    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_tensor_model_parallel_world_size()


def _check_sequence_parallel(model, ds_config, mpu):
    """Megatron's sequence parallelism leaves each tensor-parallel rank a partial gradient of the
    norm parameters it marks `sequence_parallel`; Megatron's finalize_model_grads sums them, and
    DeepSpeed does not. Under ZeRO-1 or none the caller can still sum them between backward and
    step; ZeRO-2/3 reduce gradients during backward, so nothing could sum them in time."""
    marked = [name for name, p in model.named_parameters() if getattr(p, "sequence_parallel", False)]
    if not marked or _tensor_parallel_size(mpu) == 1:
        return
    stage = (ds_config.get("zero_optimization") or {}).get("stage", 0)
    if stage >= 2:
        raise ValueError(
            f"tempo_ds.initialize: parameters marked sequence_parallel (e.g. {marked[0]}) need their "
            f"gradients summed over the tensor-parallel group before the optimizer sees them, which "
            f"ZeRO stage {stage} does not allow; use sequence_parallel=False or ZeRO stage 0/1")
    logger.warning("tempo_ds: %d parameter(s) are marked sequence_parallel (e.g. %s): call "
                   "tempo_ds.megatron.allreduce_sequence_parallel_grads(model) between engine.backward() "
                   "and engine.step(); DeepSpeed does not sum them", len(marked), marked[0])


def _tempo_for(ds_config, tempo):
    """(TempoConfig, the DeepSpeed config without "tempo"), "tempo" parsed at most once: a caller
    that parsed it already passes `tempo`; a config that also carries the key must agree with it."""
    if tempo is None:
        return split_config(ds_config) if ds_config is not None else (TempoConfig.disabled(), None)
    if not isinstance(tempo, TempoConfig):
        raise TypeError(f"tempo_ds.initialize: tempo= must be a TempoConfig, got {type(tempo).__name__}")
    if ds_config is None or "tempo" not in ds_config:
        return tempo, ds_config
    in_config, rest = split_config(ds_config)
    if in_config != tempo:
        raise TempoConfigError(
            f'tempo_ds.initialize: tempo={tempo} disagrees with the config\'s "tempo" entry '
            f"({in_config}); pass one, or the same in both")
    return tempo, rest


def initialize(args=None, model=None, optimizer=None, model_parameters=None, training_data=None,
               lr_scheduler=None, distributed_port=TORCH_DISTRIBUTED_DEFAULT_PORT, mpu=None, dist_init_required=None,
               collate_fn=None, config=None, mesh_param=None, config_params=None, *, tempo=None):
    """deepspeed.initialize with Tempo applied to `model` when ds_config says "tempo": on.

    Arguments and return value are deepspeed.initialize's: (engine, optimizer, training_dataloader,
    lr_scheduler). The "tempo" entry is read from `config`, `config_params` or
    `args.deepspeed_config` (a dict or a path) and documented in docs/config.md; it is parsed once.
    A caller that parsed it already (tempo_ds.deepspeed.config.split_config) passes the TempoConfig
    as the keyword `tempo` and may leave the key out of the config; a key that disagrees with
    `tempo` raises TempoConfigError. With Tempo on, the swap report is logged on rank 0.
    """
    kwargs = dict(args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
                  training_data=training_data, lr_scheduler=lr_scheduler,
                  distributed_port=distributed_port, mpu=mpu,
                  dist_init_required=dist_init_required, collate_fn=collate_fn, config=config,
                  mesh_param=mesh_param, config_params=config_params)

    source = _config_source(args, config, config_params)
    ds_config = load_ds_config(source)
    tempo, stripped = _tempo_for(ds_config, tempo)
    # DeepSpeed's CPU accelerator JIT-builds its shared-memory op inside deepspeed.initialize,
    # minutes without a word on a first run: built here, it says so (cached: a quick load).
    build_deepspeed_shm_op()
    if not tempo.enabled:
        return deepspeed.initialize(**kwargs)

    if model is None:
        raise ValueError('tempo_ds.initialize: "tempo" is on but no model was given')
    _check_sequence_parallel(model, ds_config or {}, mpu)
    prepare_ops(tempo, get_accelerator().device_name())
    swap_model(model, tempo)
    model.tempo_config = tempo
    if stripped is not ds_config:
        _hand_over(kwargs, args, stripped)
    initialized = deepspeed.initialize(**kwargs)
    # after deepspeed.initialize: configure() needs DeepSpeed's communication backend up
    compose_activation_checkpointing(stripped, mpu)
    return initialized


def _hand_over(kwargs, args, stripped):
    """Hand DeepSpeed the config without "tempo". DeepSpeed refuses a config given twice, so the
    stripped dict replaces whichever argument carried it."""
    kwargs["config"], kwargs["config_params"] = stripped, None
    if any(getattr(args, name, None) is not None for name in _ARGS_CONFIG_FIELDS):
        kwargs["args"] = copy.copy(args)
        for name in _ARGS_CONFIG_FIELDS:
            if hasattr(args, name):
                setattr(kwargs["args"], name, None)


def use_megatron_rng_tracker():
    """Make deepspeed.checkpointing save and restore megatron-core's RNG tracker.

    DeepSpeed's checkpoint() keeps the CPU and device generator states and its own tracker's
    states from before the forward, and restores them before it recomputes. Megatron-core's layers
    draw model-parallel dropout (the attention dropout, inside
    tensor_parallel.get_cuda_rng_tracker().fork()) from megatron's tracker, another object, which
    DeepSpeed would not restore: the recomputed forward would draw other seeds than the first one
    (Tempo: other masks regenerated in backward; stock: other masks), and the gradients would be
    wrong. DeepSpeed looks its tracker up by name at every call, so that name now answers
    megatron's tracker. Process-wide, as deepspeed.checkpointing.configure's own settings are;
    calling it again changes nothing.
    """
    from deepspeed.runtime.activation_checkpointing import checkpointing
    from megatron.core.tensor_parallel import random as megatron_random
    checkpointing.get_cuda_rng_tracker = megatron_random.get_cuda_rng_tracker


def compose_activation_checkpointing(ds_config, mpu=None):
    """What tempo_ds.initialize does, with Tempo on, for a Megatron-core model (megatron's parallel
    state initialized; otherwise nothing): use_megatron_rng_tracker(), and, when `ds_config` (a
    dict) has an "activation_checkpointing" section and deepspeed.checkpointing is not configured
    yet, deepspeed.checkpointing.configure(mpu, deepspeed_config=ds_config), as DeepSpeed's docs
    ask the user to. A caller that configured it already keeps its settings. `mpu` defaults to a
    MegatronMPU (partition_activations splits over its tensor-parallel group).
    """
    # a Megatron-core model implies megatron.core imported; never import it for another model
    if "megatron.core" not in sys.modules:
        return
    from megatron.core import parallel_state
    if not parallel_state.model_parallel_is_initialized():
        return
    use_megatron_rng_tracker()
    if "activation_checkpointing" in (ds_config or {}) and not deepspeed.checkpointing.is_configured():
        from .mpu import MegatronMPU
        deepspeed.checkpointing.configure(mpu if mpu is not None else MegatronMPU(),
                                          deepspeed_config=copy.deepcopy(ds_config))
