"""tempo_ds.workload: the names it accepts, and its one loss over both batch sources (the
dataset's, with a loss_mask, and make_batch's, without)."""
import pytest
import torch

from tempo_ds import workload

from . import megatron_utils as mu

pytest.importorskip("megatron.core")


def test_names_and_sizes():
    assert workload.arch_of("gpt2") == workload.arch_of("gpt") == "gpt"
    assert workload.arch_of("bert") == "bert"
    with pytest.raises(ValueError, match="'llama'"):
        workload.arch_of("llama")
    assert workload.shape_of("bert", "base") == workload.Shape(12, 768, 12)
    with pytest.raises(ValueError, match="size 'base' for gpt"):
        workload.shape_of("gpt", "base")
    with pytest.raises(TypeError, match="shape 'tiny'"):
        workload.model_config("tiny")
    with pytest.raises(ValueError, match="recompute 'some'"):
        workload.model_config(mu.TINY, recompute="some")


def test_padded_vocab_size():
    assert workload.padded_vocab_size(128, 1) == 128
    assert workload.padded_vocab_size(129, 1) == 256
    assert workload.padded_vocab_size(128, 2) == 256


@pytest.mark.parametrize("arch", workload.ARCHS)
def test_loss_mask(arch, megatron_world):
    model = mu.build(arch, "stock", mu.tiny_config())
    batch = mu.batch(arch)
    plain = workload.loss(arch, model, batch)
    ones = torch.ones(batch["labels"].shape)
    torch.testing.assert_close(workload.loss(arch, model, {**batch, "loss_mask": ones}), plain)
    # A mask that keeps some tokens changes the loss, alike on megatron's path and the logits path.
    partial = {**batch, "loss_mask": (torch.arange(mu.SEQ) < mu.SEQ // 4).float().expand_as(ones)}
    masked = workload.loss(arch, model, partial)
    via_logits, _ = workload.loss(arch, model, partial, return_logits=True)
    assert not torch.allclose(masked, plain)
    torch.testing.assert_close(via_logits, masked)
