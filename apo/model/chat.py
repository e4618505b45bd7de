"""The one chat format every stage uses (SFT rows, consensus, APO groups, evaluation).

Qwen2.5-VL puts image placeholders before the text in the user turn; ms-swift rows spell the same thing as
"<image>" tags in a string. Keeping both spellings here guarantees SFT, APO and evaluation see identical prompts.
"""

from __future__ import annotations

from pathlib import Path

from apo.errors import ApoError


def user_message(n_images: int, text: str) -> list[dict]:
    """Chat `messages` for the processor's template: N images, then the text."""
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def prompt_text(processor, n_images: int, prompt: str) -> str:
    """The chat-formatted prompt text (N image placeholders, the text, the generation prompt) the model answers."""
    return processor.apply_chat_template(user_message(n_images, prompt), tokenize=False, add_generation_prompt=True)


def assistant_message(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def swift_user_content(n_images: int, text: str) -> str:
    """The same user turn as an ms-swift `messages` string ("<image>" tags in front)."""
    return "<image>" * n_images + text


HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def to_rgb(im):
    """An RGB image. 16-bit grayscale (PNG mode I;16, or I holding 0..65535) is scaled from its full 16-bit range to
    8 bits (PIL's own convert clips every value above 255 to white); float images (mode F) and 32-bit values
    outside 0..65535 raise ValueError (no scaling can be assumed for them)."""
    if im.mode not in HIGH_BIT_MODES:
        return im.convert("RGB")
    import numpy as np
    from PIL import Image

    if im.mode == "F":
        raise ValueError("floating-point pixels (mode F): convert the image to 8- or 16-bit first")
    a = np.asarray(im).astype(np.int64)
    if a.size and (a.min() < 0 or a.max() > 65535):
        raise ValueError(f"{im.mode} pixels range {a.min()}..{a.max()}, outside 16 bits: convert to 8- or 16-bit")
    return Image.fromarray((a // 257).astype(np.uint8), mode="L").convert("RGB")


def load_images(paths) -> list:
    """RGB PIL images; a file that is missing or not an image raises ApoError naming it."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for p in paths:
        try:
            with Image.open(p) as im:
                images.append(to_rgb(im))
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise ApoError(f"{p}: cannot read image ({e.__class__.__name__}: {e})") from None
    return images


def image_exists(path) -> bool:
    return Path(path).is_file()
