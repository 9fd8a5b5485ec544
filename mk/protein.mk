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
protein-prep: $(STAMP) ## parse the shared structures once into the shard cache
	$(BIN)/provq-prep-structures $(PROTEIN_DATA) --cache-dir runs/cache/proteins_sample

# proteins_sample ProVQ and vanilla VQ on the shared set over PROTEIN_SEEDS (the sweep file
# experiments/sweeps/proteins_sample.yaml run locally: each seed's two runs side by side, one
# torch thread each, logs beside the run directories), the no-training floor (k-means of CA
# (theta, tau) at the same K, decoded by NeRF; one k-means seed per seed), then the table (mean ± sd over the seeds,
# also in $(PROTEIN_RUNS)/proteins_sample_table.md) and the learning curves
# ($(PROTEIN_RUNS)/proteins_sample_curve.png). `make protein-probe` and
# `make protein-transfer` read the same runs.
# PROTEIN_STEPS=N shortens every run to N steps (e.g. 300 for a quick look): warmup, transition,
# learning-rate warmup and the validation interval scale in proportion, read from each variant's
# config by provq_lightning/tools/scaled_steps.py (which refuses an N it cannot scale to, before
# anything runs); the variants then run one after the other, each one's seeds side by side.
PROTEIN_SEEDS ?= 0 1
PROTEIN_CONFIG ?= experiments/proteins_sample.yaml
PROTEIN_STEPS ?=
PROTEIN_VARIANTS = provq vanilla vanilla_norevival
PROTEIN_SWEEP = experiments/sweeps/proteins_sample.yaml
protein_sweep = $(BIN)/provq-sweep run $(PROTEIN_SWEEP) --out $(PROTEIN_RUNS) --jobs 2 --restart \
	--levels seed=$(subst $(protein_space),$(protein_comma),$(strip $(PROTEIN_SEEDS)))
# Shell: sets=the scaled overrides of variant $$v (its config: experiments/proteins_sample.yaml
# for provq, else experiments/proteins_sample_$$v.yaml, as the sweep file names them).
protein_sets = sets=$$($(BIN)/python -m provq_lightning.tools.scaled_steps \
	experiments/proteins_sample$$([ $$v = provq ] || echo _$$v).yaml $(PROTEIN_STEPS)) || exit 1
protein-sample: $(STAMP) ## ProVQ vs vanilla VQ vs the k-means floor over PROTEIN_SEEDS (PROTEIN_STEPS=N: shorter)
	$(if $(strip $(PROTEIN_STEPS)),for v in $(PROTEIN_VARIANTS); do $(protein_sets); done)
	rm -rf $(foreach v,$(PROTEIN_VARIANTS) floor,$(foreach s,$(PROTEIN_SEEDS),$(PROTEIN_RUNS)/proteins_sample_$(v)/seed_$(s)))
	mkdir -p $(PROTEIN_RUNS)
	for seed in $(PROTEIN_SEEDS); do \
		OMP_NUM_THREADS=1 $(BIN)/python -m provq_lightning.protein.floor --config $(PROTEIN_CONFIG) \
			--seed $$seed --out $(PROTEIN_RUNS)/proteins_sample_floor/seed_$$seed || exit 1; \
	done
ifeq ($(strip $(PROTEIN_STEPS)),)
	$(protein_sweep)
else
	for v in $(PROTEIN_VARIANTS); do $(protein_sets); $(protein_sweep) --levels variant=$$v $$sets \
		|| exit 1; done
endif
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
protein-transfer: $(STAMP) ## the protein-sample runs on held-out DB5.5 chains and whole chains
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

protein-test: $(STAMP) ## the protein tests
	$(BIN)/python -m pytest -q tests/protein

protein-bench: $(STAMP) ## the protein benchmark
	$(BIN)/python benchmarks/bench_protein.py

# Token probe (issue 13): a linear probe from tokens to P-SEA secondary structure and the
# token/secondary-structure mutual information, ProVQ vs vanilla over the protein-sample seeds
# (needs their runs; also written to $(PROTEIN_RUNS)/protein_probe.md).

.PHONY: protein-probe
protein-probe: $(STAMP) ## secondary-structure probe and MI of the protein-sample tokens
	$(BIN)/python -m provq_lightning.protein.probe \
		ProVQ=$(call protein_seed_dirs,proteins_sample_provq) \
		vanilla=$(call protein_seed_dirs,proteins_sample_vanilla) \
		vanilla-no-revival=$(call protein_seed_dirs,proteins_sample_vanilla_norevival) \
		--markdown $(PROTEIN_RUNS)/protein_probe.md
