"""Stage 3, "critique": APO training (config, collator, sequence log-probs, the Trainer, the CLI)."""
