"""Attention cases for the ops benchmark: Megatron-core's DotProductAttention (the unfused local
path: scores, fp32 softmax, dropout, @v) against TempoCoreAttention on its flash and its
softmax-dropout-matmul ("tempo") paths, causal, with attention dropout 0.1 as in GPT-2."""
import torch


def _config(heads, head_dim, dtype):
    from .. import workload
    # The modules need megatron's parallel state and RNG tracker (and on CPU its patches) for as
    # long as the benchmark calls them, which is the rest of this process.
    workload.hold(workload.distributed())
    return workload.model_config(workload.Shape(1, heads * head_dim, heads), dtype=dtype,
                                 attention_dropout=0.1)


def cases(Case):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from ..megatron.core_attention import TempoCoreAttention

    built = {}

    def modules(dtype, heads, head_dim, device):
        key = (dtype, heads, head_dim, device)
        if key not in built:
            config = _config(heads, head_dim, dtype)
            args = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
            built[key] = {
                "stock": DotProductAttention(**args).to(device).train(),
                "flash": TempoCoreAttention(**args, path="flash").to(device).train(),
                "tempo": TempoCoreAttention(**args, path="tempo").to(device).train(),
            }
        return built[key]

    def make(device, dtype, size):
        s, b, heads, head_dim = (1024, 4, 16, 64) if size == "large" else (256, 1, 8, 64)
        shape = (s, b, heads, head_dim)
        q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        mask = torch.triu(torch.ones(s, s, dtype=torch.bool, device=device), diagonal=1).view(1, 1, s, s)
        return q, k, v, mask

    def run(which):
        def fn(q, k, v, mask):
            module = modules(q.dtype, q.shape[2], q.shape[3], q.device)[which]
            return module(q, k, v, mask, attn_mask_type=AttnMaskType.causal)
        return fn

    # No byte counts, so no GB/s: the two paths move different tensors (the flash path makes no
    # s x s one) and attention is compute-bound; it is judged by time against the unfused path.
    return [
        Case("attention[flash] vs unfused", make, run("flash"), run("stock"), None, None),
        Case("attention[tempo] vs unfused", make, run("tempo"), run("stock"), None, None),
    ]
