"""Training stages (sft, dpo, rl) and the mechanics they share (loop)."""
