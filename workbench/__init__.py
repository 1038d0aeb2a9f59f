"""workbench: merge checkpoints, train style LoRAs, compare them in scored A/B grids."""

__version__ = "0.1.0"
