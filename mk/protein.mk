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
