# One-command GPU check (issue 14): VQ-16 training step (Lightning vs bare loop), nearest-code
# search and k-means at K=16384, eager and compiled; under 8 minutes on one GPU. Prints a
# markdown table and writes runs/gpu_check.md. Without a CUDA device it stops with one line.
GPU_CHECK_ARGS ?=

.PHONY: gpu-check

gpu-check: $(STAMP) ## the one-command GPU check (training step, search, k-means), under 8 minutes
	@$(BIN)/python benchmarks/gpu_check.py $(GPU_CHECK_ARGS)
