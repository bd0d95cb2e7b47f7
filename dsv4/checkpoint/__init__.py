"""The official checkpoint format: what it holds (`inventory`), reading it strictly, and writing random ones."""

from dsv4.checkpoint.errors import CheckpointError
from dsv4.checkpoint.inventory import TensorSpec, inventory
from dsv4.checkpoint.reader import CheckpointReader, check_inventory, open_checkpoint
from dsv4.checkpoint.synth import synthesize

__all__ = ["CheckpointError", "CheckpointReader", "TensorSpec", "check_inventory", "inventory", "open_checkpoint",
           "synthesize"]
