"""Checkpoints: loading, chat encoding, device placement, the LoRA trainer."""
