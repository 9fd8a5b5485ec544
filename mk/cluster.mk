# Sweeps on SLURM, their reports, and TensorBoard (issue 5). Included by the Makefile.
#   make sweep SWEEP=experiments/sweeps/topodisc.yaml [DRY_RUN=1] [PARTITION=gpu TIME=12:00:00 ...]
#   make sweep-report SWEEP=experiments/sweeps/topodisc.yaml
#   make tensorboard RUN=runs/sweeps/topodisc [TB_PORT=6006]
# Resource variables left empty keep the sweep file's slurm: values. SWEEP_OUT picks the sweep
# directory (default runs/sweeps/<name>); SET adds provq-fit overrides to every task, e.g.
# SET="trainer.max_steps=300 trainer.check_val_every_n_epoch=1".
SWEEP ?=
SWEEP_OUT ?=
SET ?=
DRY_RUN ?=
PARTITION ?=
ACCOUNT ?=
TIME ?=
NODES ?=
GPUS_PER_NODE ?=
CPUS_PER_TASK ?=
MEM ?=
SIGNAL ?=
MAX_PARALLEL ?=
RUN ?= runs
TB_PORT ?= 6006
TB_HOST ?= localhost

SWEEP_COMMON = $(SWEEP) $(if $(SWEEP_OUT),--out $(SWEEP_OUT)) $(foreach s,$(SET),--set $(s))
SWEEP_SLURM = $(if $(PARTITION),--partition $(PARTITION)) $(if $(ACCOUNT),--account $(ACCOUNT)) \
	$(if $(TIME),--time $(TIME)) $(if $(NODES),--nodes $(NODES)) \
	$(if $(GPUS_PER_NODE),--gpus-per-node $(GPUS_PER_NODE)) \
	$(if $(CPUS_PER_TASK),--cpus-per-task $(CPUS_PER_TASK)) $(if $(MEM),--mem $(MEM)) \
	$(if $(SIGNAL),--signal $(SIGNAL)) $(if $(MAX_PARALLEL),--max-parallel $(MAX_PARALLEL))

.PHONY: sweep sweep-check sweep-report tensorboard

sweep-check: ## stop with the usage unless SWEEP= names a sweep file (the sweep targets run it)
	@test -n "$(SWEEP)" || { echo "usage: make sweep SWEEP=experiments/sweeps/<name>.yaml [DRY_RUN=1]"; \
		ls experiments/sweeps/*.yaml; exit 2; }

sweep: $(STAMP) sweep-check ## submit SWEEP=<file> as one SLURM array job (DRY_RUN=1: print the script)
	$(if $(DRY_RUN),@)$(BIN)/provq-sweep $(if $(DRY_RUN),render,submit) $(SWEEP_COMMON) $(SWEEP_SLURM)

sweep-report: $(STAMP) sweep-check ## table and plot of the runs of SWEEP=<file>
	$(BIN)/provq-sweep report $(SWEEP_COMMON)

tensorboard: $(STAMP) ## serve RUN=<log dir> (default runs) on TB_PORT (6006)
	$(BIN)/tensorboard --logdir $(RUN) --host $(TB_HOST) --port $(TB_PORT)
