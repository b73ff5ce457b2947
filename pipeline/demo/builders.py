"""Builders for the demo Video-LLM: a tiny Qwen2-VL with its own word-level tokenizer and processor.

The model is a real ``Qwen2VLForConditionalGeneration`` (GQA language model, Qwen2-VL vision tower), so
it loads through ``AutoProcessor`` / ``AutoModelForImageTextToText`` exactly like Qwen2-VL-7B. Nothing
here downloads anything: the tokenizer is built with the ``tokenizers`` library from the world's words,
the model from a config.

Frames: the video processor keeps the world's 168x168 frames as they are (``max_pixels = 168 * 168``),
giving 6 x 6 = 36 visual tokens per temporal patch of 2 frames, and never re-samples frames
(``do_sample_frames=False``): the caller decides which frames the model sees.

The trained weights live in ``default_model_dir()`` (written by ``python -m jobs.train_demo_model``);
``model_dir.check_model_dir`` names the file a broken model directory lacks.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

from pipeline.demo import world
from pipeline.demo.model_dir import sha256_of
from pipeline.prompts import CAPTION_PROMPT, LETTERS, MCQ_INSTRUCTION

SPECIAL_TOKENS = (
    "<|endoftext|>",  # pad
    "<|im_start|>",
    "<|im_end|>",  # end of a turn: generation stops here
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
    "<|unk|>",  # any word outside the world's vocabulary
)
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MIN_PIXELS = 28 * 28 * 4
MAX_PIXELS = world.FRAME_HEIGHT * world.FRAME_WIDTH  # the world's frames pass through unresized


@dataclass(frozen=True)
class DemoModelSpec:
    """Sizes of the demo model (about 2.0M parameters, 8.1 MB in fp32)."""

    text_hidden: int = 128
    text_layers: int = 6
    text_heads: int = 4
    text_kv_heads: int = 2  # GQA: 2 query heads per KV head
    text_intermediate: int = 512
    vision_dim: int = 96
    vision_depth: int = 3
    vision_heads: int = 4
    vision_mlp_ratio: int = 2
    rope_theta: float = 10000.0
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if self.text_hidden % self.text_heads or self.text_heads % self.text_kv_heads:
            raise ValueError("text_hidden must divide by text_heads, and text_heads by text_kv_heads")
        if self.text_kv_heads >= self.text_heads:
            raise ValueError("the demo model must use GQA (text_kv_heads < text_heads)")


def world_vocabulary() -> list[str]:
    """Every word the world's prompts and answers use, plus the chat roles and option letters (sorted)."""
    texts = [CAPTION_PROMPT, MCQ_INSTRUCTION, "user assistant system", " ".join(LETTERS), ". , ? ! : ' ( )"]
    texts += [*world.COLOURS, *world.SHAPES, *world.MOTIONS, *world.COUNT_WORDS]
    for seed in range(64):  # covers every question and caption template
        item = world.eval_item(seed)
        texts += [item.caption, *(p.question for p in world.qa_pairs(item.clip)), item.mcq.prompt]
    words = set()
    for text in texts:
        words.update(piece for piece, _ in _pre_tokenizer().pre_tokenize_str(text))
    return sorted(words)


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")])


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: Qwen2-VL's special tokens first (ids 0..14), then the world's words."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in world_vocabulary():
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    core.pre_tokenizer = _pre_tokenizer()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words, no space before , . ?
    core.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        unk_token="<|unk|>",
        padding_side="left",
        model_max_length=16384,
    )


def build_processor(tokenizer: PreTrainedTokenizerFast | None = None) -> Qwen2VLProcessor:
    """The demo processor: explicit pixel limits, 2-frame temporal patches, no frame re-sampling."""
    pixels = {"min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS}
    video = Qwen2VLVideoProcessor(
        **pixels,
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
        do_sample_frames=False,
        cap_pixels_per_frame=False,
    )
    image = Qwen2VLImageProcessor(**pixels, patch_size=14, temporal_patch_size=2, merge_size=2)
    return Qwen2VLProcessor(
        image_processor=image,
        video_processor=video,
        tokenizer=tokenizer or build_tokenizer(),
        chat_template=CHAT_TEMPLATE,
    )


def build_config(tokenizer: PreTrainedTokenizerFast, spec: DemoModelSpec = DemoModelSpec()) -> Qwen2VLConfig:
    """A Qwen2-VL config of the demo size, with token ids taken from ``tokenizer``."""
    ids = tokenizer.convert_tokens_to_ids
    head_dim = spec.text_hidden // spec.text_heads
    t_section = head_dim // 8  # M-RoPE sections (t, h, w) in Qwen2-VL-7B's proportions: 16/24/24 of 64
    hw_section = (head_dim // 2 - t_section) // 2
    mrope = [head_dim // 2 - 2 * hw_section, hw_section, hw_section]
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": spec.text_hidden,
        "intermediate_size": spec.text_intermediate,
        "num_hidden_layers": spec.text_layers,
        "num_attention_heads": spec.text_heads,
        "num_key_value_heads": spec.text_kv_heads,
        "max_position_embeddings": 16384,
        "initializer_range": spec.initializer_range,
        "rope_parameters": {"rope_type": "default", "mrope_section": mrope, "rope_theta": spec.rope_theta},
        "bos_token_id": ids("<|im_start|>"),
        "eos_token_id": ids("<|im_end|>"),
        "pad_token_id": ids("<|endoftext|>"),
    }
    vision = {
        "depth": spec.vision_depth,
        "embed_dim": spec.vision_dim,
        "hidden_size": spec.text_hidden,
        "mlp_ratio": spec.vision_mlp_ratio,
        "num_heads": spec.vision_heads,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "initializer_range": spec.initializer_range,
    }
    return Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )


def spec_dict(spec: DemoModelSpec) -> dict:
    """The spec as a plain dict (for the training summary and the model card)."""
    return asdict(spec)


def build_untrained_model(target: str | Path, seed: int = 0) -> Path:
    """Save a small randomly initialised model of the demo architecture (and its processor) to ``target``:
    a fast stand-in for tests and benchmarks of the machinery (it writes nonsense).

    ``initializer_range`` is raised so the random model writes varied, input-dependent tokens (and
    lets tests see StD drafts get accepted and rejected) instead of one token forever."""
    from transformers import Qwen2VLForConditionalGeneration

    target = Path(target)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    spec = DemoModelSpec(text_hidden=64, text_layers=2, text_heads=4, text_kv_heads=2, text_intermediate=128,
                         vision_dim=32, vision_depth=1, vision_heads=2, initializer_range=0.5)  # fmt: skip
    model = Qwen2VLForConditionalGeneration(build_config(tokenizer, spec))
    model.generation_config.do_sample = False
    shutil.rmtree(target, ignore_errors=True)
    model.save_pretrained(target)
    build_processor(tokenizer).save_pretrained(target)
    return target


# ---------------------------------------------------------------------------------------------------
# Saving the model directory and its card
# ---------------------------------------------------------------------------------------------------


def save_model_dir(path: str | Path, model: torch.nn.Module, processor: Qwen2VLProcessor) -> str:
    """``save_pretrained`` the model (fp32 safetensors) and processor into ``path``; return the weights' SHA-256."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.generation_config.update(**generation_defaults(processor.tokenizer))
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return sha256_of(path / "model.safetensors")


def generation_defaults(tokenizer: PreTrainedTokenizerFast) -> dict:
    """Greedy decoding that stops at the end of the assistant turn."""
    ids = tokenizer.convert_tokens_to_ids
    return {
        "do_sample": False,
        "max_new_tokens": 32,
        "eos_token_id": [ids("<|im_end|>"), ids("<|endoftext|>")],
        "pad_token_id": ids("<|endoftext|>"),
        "bos_token_id": ids("<|im_start|>"),
    }


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
