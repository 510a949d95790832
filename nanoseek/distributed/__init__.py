"""Scale-out on torch.distributed, one concept per file.

process_group.py    torchrun environment -> process group + device mesh (nccl on CUDA, gloo on CPU)
data_parallel.py    DDP / FSDP2 wrapping, gradient-sync control, the expert-count all-reduce
expert_parallel.py  routed experts split over ranks, token dispatch with all-to-all
plan.py             memory, layout, time and cost of a training run (`nanoseek plan`)

Distributed checkpoints live in nanoseek/checkpoint/dcp.py.
"""
