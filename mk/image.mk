# Image tokenizer (issue 3). Included by the Makefile.
IMAGE_DATA ?= ../shared/data/images/imagenet_sample
IMAGE_RUNS ?= runs
# Overrides go after --config (later arguments win). One torch thread per run: the sample
# model is small and the CPU machine is shared.
IMAGE_FIT_ARGS := --trainer.logger.init_args.save_dir $(IMAGE_RUNS) \
	--trainer.logger.init_args.version sample --trainer.enable_progress_bar false

.PHONY: image-shards image-sample image-test image-bench image-rfid

# Shards of the shared photos (what ImageNetDataModule and the loader benchmark read).
image-shards: $(STAMP)
	$(BIN)/provq-make-shards $(IMAGE_DATA) $(IMAGE_RUNS)/shards/imagenet_sample --shard-size 100 \
		--overwrite

# ProVQ then vanilla VQ on the shared photos (about 5 CPU minutes each), then the comparison
# table and a reconstruction grid of held-out photos.
image-sample: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/provq-fit --config experiments/imagenet_sample_64px.yaml \
		$(IMAGE_FIT_ARGS)
	OMP_NUM_THREADS=1 $(BIN)/provq-fit --config experiments/imagenet_sample_64px_vanilla.yaml \
		$(IMAGE_FIT_ARGS)
	$(BIN)/python -m provq_lightning.image.report \
		ProVQ=$(IMAGE_RUNS)/imagenet_sample_64px_provq/sample \
		vanilla=$(IMAGE_RUNS)/imagenet_sample_64px_vanilla/sample \
		--grid $(IMAGE_RUNS)/imagenet_sample_grid.png

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
