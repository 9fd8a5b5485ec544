# Protein structure tokenizer (issue 4). Included by the Makefile.
PROTEIN_DATA ?= ../shared/data/proteins
PROTEIN_RUNS ?= runs

.PHONY: protein-prep protein-sample protein-test protein-bench

# Parse the shared sample structures once into a shard cache; prints load/skip counts.
protein-prep: $(STAMP)
	$(BIN)/provq-prep-structures $(PROTEIN_DATA) --cache-dir runs/cache/proteins_sample

# proteins_sample ProVQ vs vanilla on the shared set (about 8 CPU minutes each), then the table
# (also written to $(PROTEIN_RUNS)/proteins_sample_table.md).
protein-sample: $(STAMP)
	$(BIN)/provq-fit --config experiments/proteins_sample.yaml \
		--trainer.logger.init_args.save_dir $(PROTEIN_RUNS) --trainer.logger.init_args.version sample
	$(BIN)/provq-fit --config experiments/proteins_sample_vanilla.yaml \
		--trainer.logger.init_args.save_dir $(PROTEIN_RUNS) --trainer.logger.init_args.version sample
	$(BIN)/python -m provq_lightning.protein.report \
		ProVQ=$(PROTEIN_RUNS)/proteins_sample_provq/sample \
		vanilla=$(PROTEIN_RUNS)/proteins_sample_vanilla/sample \
		> $(PROTEIN_RUNS)/proteins_sample_table.md
	cat $(PROTEIN_RUNS)/proteins_sample_table.md

protein-test: $(STAMP)
	$(BIN)/python -m pytest -q tests/protein

protein-bench: $(STAMP)
	$(BIN)/python benchmarks/bench_protein.py

# Token probe (issue 13): a linear probe from tokens to P-SEA secondary structure and the
# token/secondary-structure mutual information, ProVQ vs vanilla over the protein-sample seeds
# (needs their runs; also written to $(PROTEIN_RUNS)/protein_probe.md).
PROTEIN_SEEDS ?= 0 1
protein_empty :=
protein_space := $(protein_empty) $(protein_empty)
protein_comma := ,
# $(call protein_seed_dirs,NAME): the seeds' run directories of NAME, comma-separated.
protein_seed_dirs = $(subst $(protein_space),$(protein_comma),$(strip \
	$(foreach s,$(PROTEIN_SEEDS),$(PROTEIN_RUNS)/$(1)/seed_$(s))))

.PHONY: protein-probe
protein-probe: $(STAMP)
	$(BIN)/python -m provq_lightning.protein.probe \
		ProVQ=$(call protein_seed_dirs,proteins_sample_provq) \
		vanilla=$(call protein_seed_dirs,proteins_sample_vanilla) \
		--markdown $(PROTEIN_RUNS)/protein_probe.md
