# Sourced by the GPU scripts (after they set OUT and create it): the path of the CUDA
# libraries (cuBLASLt, NCCL), and the GPU's clocks and power now in $OUT/gpu_state.csv
# (lent machines ran the memory-bound kernels up to 2x apart; the GEMMs did not vary).
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,power.draw,power.limit,temperature.gpu \
    --format=csv > "$OUT/gpu_state.csv" 2>&1
