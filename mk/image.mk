# Image tokenizer (issue 3). Included by the Makefile.
IMAGE_DATA ?= ../shared/data/images/imagenet_sample
IMAGE_RUNS ?= runs
comma := ,
# Overrides go after --config (later arguments win). One torch thread per run: the sample
# model is small and the CPU machine is shared.
IMAGE_FIT_ARGS := --trainer.logger.init_args.save_dir $(IMAGE_RUNS) \
	--trainer.logger.init_args.version sample --trainer.enable_progress_bar false

.PHONY: image-shards image-sample image-test image-bench image-rfid

# Shards of the shared photos (what ImageNetDataModule and the loader benchmark read).
image-shards: $(STAMP)
	$(BIN)/provq-make-shards $(IMAGE_DATA) $(IMAGE_RUNS)/shards/imagenet_sample --shard-size 100 \
		--overwrite

# ProVQ and vanilla VQ on the shared photos over IMAGE_SEEDS (each seed's two runs side by side,
# one torch thread each, about 12 minutes per pair), then the table (mean and spread over the
# seeds), a reconstruction grid of held-out photos (first seed) and the learning curves.
IMAGE_SEEDS ?= 0 1
IMAGE_SAMPLE_RUNS = $(foreach s,$(IMAGE_SEEDS),$(IMAGE_RUNS)/imagenet_sample_64px_$(1)/seed_$(s))
image-sample: $(STAMP)
	rm -rf $(call IMAGE_SAMPLE_RUNS,provq) $(call IMAGE_SAMPLE_RUNS,vanilla)
	mkdir -p $(IMAGE_RUNS)
	for seed in $(IMAGE_SEEDS); do \
		pids=; \
		for variant in provq vanilla; do \
			config=experiments/imagenet_sample_64px$$( [ $$variant = vanilla ] && echo _vanilla ).yaml; \
			OMP_NUM_THREADS=1 $(BIN)/provq-fit --config $$config $(IMAGE_FIT_ARGS) \
				--seed_everything $$seed --data.init_args.seed $$seed \
				--trainer.logger.init_args.version seed_$$seed \
				> $(IMAGE_RUNS)/imagenet_sample_$${variant}_seed_$$seed.log 2>&1 & pids="$$pids $$!"; \
		done; \
		for pid in $$pids; do wait $$pid || { echo "image-sample: a run of seed $$seed failed:" \
			"see $(IMAGE_RUNS)/imagenet_sample_*_seed_$$seed.log"; exit 1; }; done; \
	done
	$(BIN)/python -m provq_lightning.image.report \
		ProVQ=$(subst $(eval) ,$(comma),$(call IMAGE_SAMPLE_RUNS,provq)) \
		vanilla=$(subst $(eval) ,$(comma),$(call IMAGE_SAMPLE_RUNS,vanilla)) \
		--grid $(IMAGE_RUNS)/imagenet_sample_grid.png --curve $(IMAGE_RUNS)/imagenet_sample_curve.png \
		--markdown $(IMAGE_RUNS)/imagenet_sample_table.md

image-test: $(STAMP)
	$(BIN)/python -m pytest -q tests/image

image-bench: $(BENCH_STAMP)
	$(BIN)/python benchmarks/bench_image.py

# rFID as the paper reports it (docs/images.md#rfid-as-the-paper-reports-it):
#   make image-rfid RFID_CKPT=<run>/checkpoints/last.ckpt RFID_DATA=/data/imagenet/val
# writes $(RFID_OUT)/reference.npz, reconstructions.npz (ADM sample batches) and rfid.json.
RFID_DATA ?= $(IMAGE_DATA)
RFID_OUT ?= $(IMAGE_RUNS)/rfid
RFID_ARGS ?=
image-rfid: $(STAMP)
	@test -n "$(RFID_CKPT)" || { echo "make image-rfid: set RFID_CKPT=<run>/checkpoints/last.ckpt"; exit 2; }
	$(BIN)/python -m provq_lightning.image.rfid --ckpt $(RFID_CKPT) --data $(RFID_DATA) \
		--out $(RFID_OUT) $(RFID_ARGS)
