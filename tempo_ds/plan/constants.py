"""The figures the planner cannot count on a CPU: what a GPU process holds beside the tensors.

Everything else the plan predicts is counted (tempo_ds.plan.walk) or follows from the parameter
count (tempo_ds.plan.states). These three are measured once per card and kept here, in one
place, each with the card and the recorded points that set it (docs/plan.md, "Constants").

  context     bytes of device memory the process holds outside PyTorch's caching allocator (the
              CUDA context, cuBLAS and NCCL buffers): subtracted from a whole card, not from an
              allocator budget (torch.cuda.set_per_process_memory_fraction caps the allocator only);
  reserve     bytes below its cap at which the caching allocator stops finding room
              (fragmentation: a new block must fit in free memory that cached blocks split);
  engine      bytes the DeepSpeed engine holds at the step's peak beyond the counted model states
              (its bf16 ZeRO buffers, the cuBLAS workspace, the data batch): the recorded peak
              less the walk's peak and the counted states.

Each value came from ONE recorded point of the H100 80GB HBM3 runs of 2026-11-26
(docs/results/h100_2026-11-26); the other points judge them (tests/test_plan.py):
  engine, context  GPT-2 345M s=1024, stock, full card: largest micro-batch 18, peak 77,913,807,872 B;
                   engine = that peak - walk peak(18) - states; context = total - (the midpoint of
                   the peak at 18 and the predicted peak at 19, where it ran out) - reserve;
  reserve          GPT-2 345M s=1024, selective recomputation, 16 GiB budget: micro-batch 8 fits
                   (best peak 15,937,420,800 B), 9 does not: the cap less the midpoint of the
                   peak at 8 and the predicted peak at 9.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class CardConstants:
    """The measured constants of one card model (module docstring)."""
    card: str
    total_bytes: int      # torch.cuda.get_device_properties(0).total_memory
    context: int
    reserve: int
    engine: int
    source: str


# total_bytes: the 79.11 GiB PyTorch reports as this card's total capacity (its out-of-memory
# message); context/reserve/engine: tempo_ds.plan.calibrate on the points named above.
H100_80GB_HBM3 = CardConstants(
    card="NVIDIA H100 80GB HBM3",
    total_bytes=84_943_945_728,
    context=3_979_693_360,
    reserve=1_039_183_056,
    engine=-166_804_480,
    source="docs/results/h100_2026-11-26 (GPT-2 345M stock full card; selective 16 GiB budget)",
)

CARDS = {H100_80GB_HBM3.card: H100_80GB_HBM3}
DEFAULT = H100_80GB_HBM3
