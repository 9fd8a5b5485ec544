"""Image tokenizer: LlamaGen's VQGAN under the ProVQ curriculum, data, losses and metrics."""
