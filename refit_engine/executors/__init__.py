"""Executors run one rank's compiled plan: CPU over gloo here; CUDA over NCCL when built."""
