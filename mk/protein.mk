# Protein structure tokenizer (issue 4). Included by the Makefile.
PROTEIN_DATA ?= ../shared/data/proteins
PROTEIN_RUNS ?= runs
protein_empty :=
protein_space := $(protein_empty) $(protein_empty)
protein_comma := ,
# $(call protein_seed_dirs,NAME): the seeds' run directories of NAME, comma-separated.
protein_seed_dirs = $(subst $(protein_space),$(protein_comma),$(strip \
	$(foreach s,$(PROTEIN_SEEDS),$(PROTEIN_RUNS)/$(1)/seed_$(s))))

.PHONY: protein-prep protein-sample protein-test protein-bench

# Parse the shared sample structures once into a shard cache; prints load/skip counts.
protein-prep: $(STAMP)
	$(BIN)/provq-prep-structures $(PROTEIN_DATA) --cache-dir runs/cache/proteins_sample

# proteins_sample ProVQ and vanilla VQ on the shared set over PROTEIN_SEEDS (the sweep file
# experiments/sweeps/proteins_sample.yaml run locally: each seed's two runs side by side, one
# torch thread each, logs beside the run directories), the no-training floor (k-means of CA
# (theta, tau) at the same K, decoded by NeRF; one k-means seed per seed), then the table (mean ± sd over the seeds,
# also in $(PROTEIN_RUNS)/proteins_sample_table.md) and the learning curves
# ($(PROTEIN_RUNS)/proteins_sample_curve.png). `make protein-probe` and
# `make protein-transfer` read the same runs.
PROTEIN_SEEDS ?= 0 1
PROTEIN_CONFIG ?= experiments/proteins_sample.yaml
protein-sample: $(STAMP)
	rm -rf $(foreach v,provq vanilla vanilla_norevival floor,$(foreach s,$(PROTEIN_SEEDS),$(PROTEIN_RUNS)/proteins_sample_$(v)/seed_$(s)))
	mkdir -p $(PROTEIN_RUNS)
	for seed in $(PROTEIN_SEEDS); do \
		OMP_NUM_THREADS=1 $(BIN)/python -m provq_lightning.protein.floor --config $(PROTEIN_CONFIG) \
			--seed $$seed --out $(PROTEIN_RUNS)/proteins_sample_floor/seed_$$seed || exit 1; \
	done
	$(BIN)/provq-sweep run experiments/sweeps/proteins_sample.yaml --out $(PROTEIN_RUNS) --jobs 2 \
		--restart --levels seed=$(subst $(protein_space),$(protein_comma),$(strip $(PROTEIN_SEEDS)))
	$(BIN)/python -m provq_lightning.protein.report \
		ProVQ=$(call protein_seed_dirs,proteins_sample_provq) \
		vanilla=$(call protein_seed_dirs,proteins_sample_vanilla) \
		vanilla-no-revival=$(call protein_seed_dirs,proteins_sample_vanilla_norevival) \
		floor=$(call protein_seed_dirs,proteins_sample_floor) \
		--markdown $(PROTEIN_RUNS)/proteins_sample_table.md \
		--curve $(PROTEIN_RUNS)/proteins_sample_curve.png

# The protein-sample runs (and the floor) scored on chains they never saw (the held-out 15% of
# the DB5.5 structures: provq-fit test --data.init_args.test_on_holdout true) and on whole
# validation chains (provq-fit validate, crop_length null), beside the validation crops
# (also in $(PROTEIN_RUNS)/proteins_sample_transfer.md).
.PHONY: protein-transfer
protein-transfer: $(STAMP)
	for run in $(foreach v,provq vanilla,$(foreach s,$(PROTEIN_SEEDS),$(PROTEIN_RUNS)/proteins_sample_$(v)/seed_$(s))); do \
		OMP_NUM_THREADS=1 $(BIN)/provq-fit test --config $$run/config.yaml --ckpt_path last \
			--data.init_args.test_on_holdout true --trainer.enable_progress_bar false \
			> $$run.transfer.log 2>&1 || { echo "see $$run.transfer.log"; exit 1; }; \
		OMP_NUM_THREADS=1 $(BIN)/provq-fit validate --config $$run/config.yaml --ckpt_path last \
			--data.init_args.crop_length null --data.init_args.batch_size 1 \
			--trainer.enable_progress_bar false \
			>> $$run.transfer.log 2>&1 || { echo "see $$run.transfer.log"; exit 1; }; \
	done
	for seed in $(PROTEIN_SEEDS); do \
		floor=$(PROTEIN_RUNS)/proteins_sample_floor/seed_$$seed; \
		OMP_NUM_THREADS=1 $(BIN)/python -m provq_lightning.protein.floor --config $(PROTEIN_CONFIG) \
			--seed $$seed --split holdout --out $$floor/eval/test-floor || exit 1; \
		OMP_NUM_THREADS=1 $(BIN)/python -m provq_lightning.protein.floor --config $(PROTEIN_CONFIG) \
			--seed $$seed --whole-chains --out $$floor/eval/validate-floor || exit 1; \
	done
	$(BIN)/python -m provq_lightning.protein.eval_report \
		ProVQ=$(call protein_seed_dirs,proteins_sample_provq) \
		vanilla=$(call protein_seed_dirs,proteins_sample_vanilla) \
		floor=$(call protein_seed_dirs,proteins_sample_floor) \
		--markdown $(PROTEIN_RUNS)/proteins_sample_transfer.md

protein-test: $(STAMP)
	$(BIN)/python -m pytest -q tests/protein

protein-bench: $(STAMP)
	$(BIN)/python benchmarks/bench_protein.py

# Token probe (issue 13): a linear probe from tokens to P-SEA secondary structure and the
# token/secondary-structure mutual information, ProVQ vs vanilla over the protein-sample seeds
# (needs their runs; also written to $(PROTEIN_RUNS)/protein_probe.md).

.PHONY: protein-probe
protein-probe: $(STAMP)
	$(BIN)/python -m provq_lightning.protein.probe \
		ProVQ=$(call protein_seed_dirs,proteins_sample_provq) \
		vanilla=$(call protein_seed_dirs,proteins_sample_vanilla) \
		vanilla-no-revival=$(call protein_seed_dirs,proteins_sample_vanilla_norevival) \
		--markdown $(PROTEIN_RUNS)/protein_probe.md
