"""Sequence log-probabilities: log pi(response | image, prompt) = sum of token log-probs over label positions.

Memory: the model is asked for logits only at the positions that predict a labelled token (`logits_to_keep`
with a position tensor, the union over rows), so image and prompt tokens never reach the lm_head; the log-softmax
is then taken in float32 over `chunk_size` tokens at a time (logsumexp + gather), never as one float32
[tokens, vocab] tensor.
"""

import contextlib

import torch

MODEL_INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")


@contextlib.contextmanager
def eval_mode(module):
    """`module` in eval mode for a pass with no backward (no dropout, no gradient-checkpointing wrappers), then
    back to the mode it had."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def keep_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions p whose logits predict a labelled token p+1, in any row."""
    return (labels[:, 1:] != -100).any(0).nonzero().squeeze(1)


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024):
    """logits [R, K, V] aligned with targets [R, K] (-100 = ignore) -> (summed log-probs [R] float32, tokens [R])."""
    mask = targets != -100
    rows = mask.nonzero()[:, 0]
    sel, tgt = logits[mask], targets[mask]  # [T, V], [T]: labelled tokens only
    parts = []
    for lg, t in zip(sel.split(chunk_size), tgt.split(chunk_size)):
        lg = lg.float()
        parts.append(lg.gather(1, t[:, None]).squeeze(1) - lg.logsumexp(-1))
    tok = torch.cat(parts) if parts else sel.new_zeros(0, dtype=torch.float32)
    logps = torch.zeros(targets.shape[0], dtype=torch.float32, device=logits.device).index_add(0, rows, tok)
    return logps, mask.sum(1)


def forward_logps(model, batch: dict, chunk_size: int = 1024):
    """Run `model` on the candidate rows of a collated batch -> (summed response log-probs [R], tokens [R])."""
    labels = batch["labels"]
    keep = keep_positions(labels)
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    out = model(**inputs, logits_to_keep=keep, use_cache=False)
    return sequence_logps(out.logits, labels[:, keep + 1], chunk_size)
