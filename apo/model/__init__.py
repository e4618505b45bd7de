"""Model-side code: loading, prompts (chat), generation and its KV cache (decoding), attention-kernel wrapping,
the packed-group training kernel (packing) and the log-prob helpers (logps)."""
