"""Apply a TempoConfig to a model that was built stock: build the ops, swap the modules.

The swapping is tempo_ds.modules.swap.swap_modules, the one mechanism, with the kinds the config
turns on and its attention path. The rows come from the layers that know each model (torch's in
tempo_ds.modules.swap, Megatron's in tempo_ds.megatron.swaps), so nothing here knows a framework's
internals. What was swapped and what was left stock, with the reason, is logged on rank 0: INFO for
each kind, WARNING for a kind the config turned on that left stock parts. A model already built
from the Tempo specs has nothing left to swap; that is not an error.
"""
import logging

from ..modules.swap import SwapRefused, swap_modules
from .config import KIND_FIELDS, TempoConfigError

logger = logging.getLogger("tempo_ds")


def swap_model(model, config, log=True):
    """Swap the stock parts of `model` that `config` (a TempoConfig) turns on, in place.

    Returns the tempo_ds.modules.swap.SwapReport; with `log`, logs its summary (log_report).
    Raises TempoConfigError, with nothing swapped, when the config asks for what the model cannot
    take (e.g. "tempo.attention": "flash" for an attention given a padding mask).
    """
    try:
        report = swap_modules(model, kinds=config.kinds, options=config.swap_options(),
                              off_reason=config.off_reason)
    except SwapRefused as err:
        raise TempoConfigError(f'"tempo.{KIND_FIELDS[err.kind]}": {err}') from None
    if log:
        log_report(report)
    return report


def show_info_by_default():
    """Make INFO records of the "tempo_ds" logger visible where the application set up no logging:
    attach a stderr handler when neither that logger nor the root logger has one. An application
    that configured logging keeps its own choice."""
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


def _is_rank_zero():
    import torch.distributed as dist
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def log_report(report):
    """Log a SwapReport on rank 0, one record per kind ("tempo_ds: swap gelu: swapped 4, no stock
    ones left"): WARNING for a kind asked for that left stock parts, INFO otherwise."""
    if not _is_rank_zero():
        return
    show_info_by_default()
    for kind, text in report.lines():
        logger.log(logging.WARNING if report.warns(kind) else logging.INFO, "tempo_ds: swap %s", text)


def prepare_ops(config, device_type):
    """Build (or find prebuilt) every op family for `device_type` before training starts.

    With build="prebuilt" a family that was not installed with TEMPO_BUILD_OPS=1 is an error here,
    not a JIT build in the middle of the first step. Returns the names of the ops loaded.
    """
    from ..op_builder import FAMILIES
    from ..ops._backend import builder_for

    loaded = []
    for family in sorted(FAMILIES):
        builder = builder_for(family, device_type)()
        if config.build == "prebuilt" and builder.prebuilt() is None:
            raise RuntimeError(
                f'"tempo.build": "prebuilt" but op {builder.NAME} is not prebuilt, or its prebuilt '
                f'module was built from other sources than csrc/ holds now; install with '
                f'TEMPO_BUILD_OPS=1 pip install . or set "tempo.build": "jit"')
        builder.load(verbose=False)
        loaded.append(builder.NAME)
    if _is_rank_zero():
        show_info_by_default()
    logger.info("tempo_ds: ops ready (%s, build=%s): %s", device_type, config.build, ", ".join(loaded))
    return loaded
