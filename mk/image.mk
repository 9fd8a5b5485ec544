# Image tokenizer (issue 3). Included by the Makefile.
IMAGE_DATA ?= ../shared/data/images/imagenet_sample
IMAGE_RUNS ?= runs
comma := ,
.PHONY: image-shards image-sample image-test image-bench image-rfid

# Shards of the shared photos (what ImageNetDataModule and the loader benchmark read).
image-shards: $(STAMP) ## webdataset shards of the shared photos
	$(BIN)/provq-make-shards $(IMAGE_DATA) $(IMAGE_RUNS)/shards/imagenet_sample --shard-size 100 \
		--overwrite

# ProVQ and vanilla VQ on the shared photos over IMAGE_SEEDS: the sweep file
# experiments/sweeps/imagenet_sample.yaml run here from scratch (each seed's two runs side by
# side, one torch thread each, about 12 minutes per pair; a run's log is <run dir>.log), then the
# table (mean and spread over the seeds), a reconstruction grid of held-out photos (first seed)
# and the learning curves.
IMAGE_SEEDS ?= 0 1
IMAGE_SAMPLE_RUNS = $(foreach s,$(IMAGE_SEEDS),$(IMAGE_RUNS)/imagenet_sample_64px_$(1)/seed_$(s))
image-sample: $(STAMP) ## 64px ProVQ vs vanilla VQ on the shared photos over IMAGE_SEEDS: table, grid, curves
	$(BIN)/provq-sweep run experiments/sweeps/imagenet_sample.yaml --out $(IMAGE_RUNS) --jobs 2 \
		--restart --levels seed=$(subst $(eval) ,$(comma),$(strip $(IMAGE_SEEDS)))
	$(BIN)/python -m provq_lightning.image.report \
		ProVQ=$(subst $(eval) ,$(comma),$(call IMAGE_SAMPLE_RUNS,provq)) \
		vanilla=$(subst $(eval) ,$(comma),$(call IMAGE_SAMPLE_RUNS,vanilla)) \
		--grid $(IMAGE_RUNS)/imagenet_sample_grid.png --curve $(IMAGE_RUNS)/imagenet_sample_curve.png \
		--markdown $(IMAGE_RUNS)/imagenet_sample_table.md

image-test: $(STAMP) ## the image tests
	$(BIN)/python -m pytest -q tests/image

image-bench: $(BENCH_STAMP) ## the image benchmark
	$(BIN)/python benchmarks/bench_image.py

# rFID as the paper reports it (docs/images.md#rfid-as-the-paper-reports-it):
#   make image-rfid RFID_CKPT=<run>/checkpoints/last.ckpt RFID_DATA=/data/imagenet/val
# writes $(RFID_OUT)/reference.npz, reconstructions.npz (ADM sample batches) and rfid.json.
RFID_DATA ?= $(IMAGE_DATA)
RFID_OUT ?= $(IMAGE_RUNS)/rfid
RFID_ARGS ?=
image-rfid: $(STAMP) ## rFID as the paper reports it (RFID_CKPT=<ckpt> RFID_DATA=<folder>)
	@test -n "$(RFID_CKPT)" || { echo "make image-rfid: set RFID_CKPT=<run>/checkpoints/last.ckpt"; exit 2; }
	$(BIN)/python -m provq_lightning.image.rfid --ckpt $(RFID_CKPT) --data $(RFID_DATA) \
		--out $(RFID_OUT) $(RFID_ARGS)
