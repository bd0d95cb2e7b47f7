"""Supervised fine-tuning (LoRA or full weights) on the inference model's own code; see docs/finetune.md."""
