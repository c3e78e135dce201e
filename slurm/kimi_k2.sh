#!/bin/bash
# Kimi K2 refit benchmark sweep: source TP -> destination TP, timed refits, seed-style summary.
#
#   sbatch slurm/kimi_k2.sh                         # 16 nodes x 8 GPUs, NCCL, collocated
#   NON_COLLOCATED=1 sbatch slurm/kimi_k2.sh        # also the non-collocated configurations
#   CONFIGS="4:2:collocated:nccl" NUM_LAYERS=8 sbatch --nodes=2 slurm/kimi_k2.sh
#
# Every knob is an environment variable (sbatch passes the environment through); the #SBATCH
# lines below are defaults that sbatch's own flags override (--nodes, --time, --partition, ...).
#SBATCH --job-name=kimi_k2_refit
#SBATCH --nodes=16
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=02:00:00
#SBATCH --output=kimi_k2_refit_%j.out
set -euo pipefail

# -- knobs ------------------------------------------------------------------------------------
PYTHON=${PYTHON:-python3}
BACKEND=${BACKEND:-nccl}                       # nccl (GPUs) or gloo (CPU processes)
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-8}}   # processes per node
NODES=${SLURM_JOB_NUM_NODES:-${NODES:-1}}
NUM_LAYERS=${NUM_LAYERS:-61}                   # Kimi K2 has 61; fewer to test the refit logic
NUM_ITERATIONS=${NUM_ITERATIONS:-5}
NUM_WARMUP=${NUM_WARMUP:-2}
GPU_KIND=${GPU_KIND:-h100}                     # memory and bandwidth preset: h100, h200, cpu
FULL_SIZE=${FULL_SIZE:-1}                      # 0: toy Kimi K2 (MODEL_OVERRIDES sets its sizes)
MODEL_OVERRIDES=${MODEL_OVERRIDES:-}
COMPARE_MEGATRON=${COMPARE_MEGATRON:-0}        # 1: also time megatron-core's refit
OUTPUT_DIR=${OUTPUT_DIR:-benchmark_results/kimi_k2}
RUN_ID=${RUN_ID:-${SLURM_JOB_ID:-$(date +%Y%m%d_%H%M%S)}}
DEFAULT_CONFIGS="8:4:collocated:${BACKEND} 8:2:collocated:${BACKEND} 8:1:collocated:${BACKEND} 4:2:collocated:${BACKEND} 4:1:collocated:${BACKEND}"
if [[ "${NON_COLLOCATED:-0}" == 1 ]]; then
  DEFAULT_CONFIGS+=" 8:4:non-collocated:${BACKEND} 4:2:non-collocated:${BACKEND}"
fi
CONFIGS=${CONFIGS:-$DEFAULT_CONFIGS}
SRC_EXTRA=${SRC_EXTRA:-}                       # e.g. ep=64 (default: EP chosen so both fit)
DST_EXTRA=${DST_EXTRA:-}

# -- launch environment -----------------------------------------------------------------------
MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" | head -n 1)}
MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
export MASTER_ADDR MASTER_PORT RUN_ID OUTPUT_DIR BACKEND CONFIGS NUM_ITERATIONS NUM_WARMUP \
  GPU_KIND FULL_SIZE COMPARE_MEGATRON SRC_EXTRA DST_EXTRA
export LOCAL_WORLD_SIZE=$GPUS_PER_NODE
export MODEL_OVERRIDES="num_layers=${NUM_LAYERS}${MODEL_OVERRIDES:+,$MODEL_OVERRIDES}"
# NCCL settings pass through from the submitting shell (NCCL_DEBUG, NCCL_IB_HCA,
# NCCL_SOCKET_IFNAME, ...). NVLink SHARP stays off unless asked for.
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::UserWarning}   # megatron-core's config chatter
TOTAL=$((NODES * GPUS_PER_NODE))
mkdir -p "$OUTPUT_DIR/logs"

echo "Kimi K2 refit sweep: run $RUN_ID, $NODES node(s) x $GPUS_PER_NODE = $TOTAL ranks, backend $BACKEND"
echo "configurations: $CONFIGS"
echo "master $MASTER_ADDR:$MASTER_PORT; results in $OUTPUT_DIR/logs/${RUN_ID}_*"

# -- memory check before any job step: refuse configurations that cannot fit ------------------
# (FULL_SIZE and the other knobs reach the sweep through the environment.)
if ! "$PYTHON" -m refit_engine.sweep --check-only --gpus "$TOTAL"; then
  echo "refusing to start: a configuration does not fit (see above); change CONFIGS, SRC_EXTRA/DST_EXTRA or NUM_LAYERS" >&2
  exit 2
fi

# -- the sweep: one process per GPU (or per CPU slot with BACKEND=gloo) -------------------------
srun --ntasks-per-node="$GPUS_PER_NODE" --kill-on-bad-exit=1 \
  "$PYTHON" -m refit_engine.sweep
echo "summary: $OUTPUT_DIR/logs/${RUN_ID}_summary.txt"
