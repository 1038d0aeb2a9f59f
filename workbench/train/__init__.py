"""LoRA training: datasets and checks, aspect buckets, captions, latent/text caches, the loop and export."""
