"""Generation core: loading pipelines, precision, memory planning, samplers."""
