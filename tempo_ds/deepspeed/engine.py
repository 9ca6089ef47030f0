"""tempo_ds.initialize: deepspeed.initialize that also honours `"tempo"` in ds_config.

    engine, optimizer, loader, scheduler = tempo_ds.initialize(model=model, config="ds.json", ...)

With "tempo" false or absent the call is deepspeed.initialize with the same arguments, untouched.
With it on, before DeepSpeed sees the model: the "tempo" entry is validated (a mistake fails here,
not silently), the ops are built or found prebuilt, the stock modules are swapped for Tempo ones
keeping their parameters, and the "tempo" key is removed from the config handed to DeepSpeed.
"""
import copy
import logging

import deepspeed
from deepspeed.accelerator import get_accelerator
from deepspeed.constants import TORCH_DISTRIBUTED_DEFAULT_PORT

from .apply import prepare_ops, swap_model
from .config import TempoConfig, load_ds_config, split_config

logger = logging.getLogger("tempo_ds")


def read_tempo_config(args=None, config=None, config_params=None):
    """The TempoConfig that deepspeed.initialize's config arguments carry (same precedence as
    DeepSpeed: config, then config_params, then args.deepspeed_config)."""
    source = _config_source(args, config, config_params)
    ds_config = load_ds_config(source)
    if ds_config is None:
        return TempoConfig.disabled()
    return TempoConfig.parse(ds_config.get("tempo"))


def _config_source(args, config, config_params):
    if config is None:
        config = config_params
    if config is None and args is not None:
        config = getattr(args, "deepspeed_config", None)
    return config


def initialize(args=None, model=None, optimizer=None, model_parameters=None, training_data=None,
               lr_scheduler=None, distributed_port=TORCH_DISTRIBUTED_DEFAULT_PORT, mpu=None, dist_init_required=None,
               collate_fn=None, config=None, mesh_param=None, config_params=None):
    """deepspeed.initialize with Tempo applied to `model` when ds_config says "tempo": on.

    Arguments and return value are deepspeed.initialize's: (engine, optimizer, training_dataloader,
    lr_scheduler). The "tempo" entry is read from `config`, `config_params` or
    `args.deepspeed_config` (a dict or a path) and documented in docs/config.md.
    """
    kwargs = dict(args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
                  training_data=training_data, lr_scheduler=lr_scheduler,
                  distributed_port=distributed_port, mpu=mpu,
                  dist_init_required=dist_init_required, collate_fn=collate_fn, config=config,
                  mesh_param=mesh_param, config_params=config_params)

    source = _config_source(args, config, config_params)
    ds_config = load_ds_config(source)
    tempo = TempoConfig.disabled() if ds_config is None else TempoConfig.parse(ds_config.get("tempo"))
    if not tempo.enabled:
        return deepspeed.initialize(**kwargs)

    if model is None:
        raise ValueError('tempo_ds.initialize: "tempo" is on but no model was given')
    prepare_ops(tempo, get_accelerator().device_name())
    swap_model(model, tempo)
    model.tempo_config = tempo

    _, stripped = split_config(ds_config)
    # DeepSpeed refuses a config given twice (args.deepspeed_config and config=), so the stripped
    # dict replaces whichever argument carried it.
    kwargs["config"], kwargs["config_params"] = stripped, None
    if args is not None and getattr(args, "deepspeed_config", None) is not None:
        kwargs["args"] = copy.copy(args)
        kwargs["args"].deepspeed_config = None
    return deepspeed.initialize(**kwargs)
