"""Helpers shared by several test modules (not tests themselves): real-layout key tables
(`formats_keys`), denoiser inputs of the right shapes (`denoiser_inputs`) and the LoRA module names
kohya sd-scripts writes (`kohya_keys`)."""
