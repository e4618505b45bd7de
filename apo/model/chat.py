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


def load_images(paths) -> list:
    """RGB PIL images; a file that is missing or not an image raises ApoError naming it."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for p in paths:
        try:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise ApoError(f"{p}: cannot read image ({e.__class__.__name__}: {e})") from None
    return images


def image_exists(path) -> bool:
    return Path(path).is_file()
