"""Files on disk: safetensors reading/writing, architecture detection, block tables, hashes."""
