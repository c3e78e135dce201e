"""What our refit is compared with, run in the same job: megatron-core's own refit."""
