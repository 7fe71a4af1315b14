"""Chat templates: conversation turns -> token ids + loss mask (assistant answers and their end-of-turn).

Turns are (role, text) with role in system/user/assistant; `<image>` in a text marks where an image goes.
Special tokens are placed by id, text between them is encoded on its own; this equals tokenizing the
rendered string with special-token splitting, which is what HF processors do.
"""
from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

from vlm_jax.data import tokenizer as tok
from vlm_jax.registry import TEMPLATES

IMAGE_PLACEHOLDER = "<image>"
ROLES = ("system", "user", "assistant")

register_template = TEMPLATES.register  # on a Template subclass


def get_template(name: str, tokenizer: tok.Tokenizer) -> "Template":
    return TEMPLATES.get(name)(tokenizer)


class Template:
    """Subclasses define the pieces around each turn; `encode` assembles them."""

    def __init__(self, tokenizer: tok.Tokenizer):
        self.tokenizer = tokenizer
        self.image_id = tokenizer.image_id
        self.pad_id = tokenizer.pad_id

    def begin(self) -> list[int]:
        raise NotImplementedError

    def header(self, role: str) -> list[int]:
        raise NotImplementedError

    def end_of_turn(self) -> list[int]:
        raise NotImplementedError

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end generation."""
        return tuple(self.end_of_turn()[-1:]) + (self.tokenizer.eos_id,)

    def chat_template(self) -> str:
        """This template as a Hugging Face (Jinja) chat template: tokenizing its rendering, special tokens split
        out, gives exactly the ids of `encode` (with add_generation_prompt alike). A message's content is a
        string (`<image>` or `<|image|>` mark images) or a list of {"type": "image"} / {"type": "text"} items."""
        literal = lambda ids: json.dumps(self.tokenizer.decode(ids))  # noqa: E731 (a Jinja string literal)
        image = literal([self.image_id])
        headers = ", ".join(f"{json.dumps(role)}: {literal(self.header(role))}" for role in ROLES)
        return (
            f"{{%- set headers = {{{headers}}} -%}}{{{{ {literal(self.begin())} }}}}"
            "{%- for message in messages -%}"
            "{%- if message.role not in headers -%}{{ raise_exception('unknown role ' + message.role) }}{%- endif -%}"
            "{%- if message.content is string -%}"
            f"{{%- set text = message.content | replace({json.dumps(IMAGE_PLACEHOLDER)}, {image}) -%}}"
            "{%- else -%}{%- set ns = namespace(text='') -%}{%- for item in message.content -%}"
            f"{{%- if item.type == 'image' -%}}{{%- set ns.text = ns.text + {image} -%}}"
            "{%- elif item.type == 'text' -%}{%- set ns.text = ns.text + item.text -%}{%- endif -%}"
            "{%- endfor -%}{%- set text = ns.text -%}{%- endif -%}"
            f"{{{{ headers[message.role] + (text | trim) + {literal(self.end_of_turn())} }}}}"
            "{%- endfor -%}"
            f"{{%- if add_generation_prompt -%}}{{{{ headers['assistant'] }}}}{{%- endif -%}}")

    def encode_text(self, text: str) -> list[int]:
        """Text with `<image>` placeholders -> ids with the image token in their place."""
        ids: list[int] = []
        for k, part in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if k:
                ids.append(self.image_id)
            if part:
                ids.extend(self.tokenizer.encode(part))
        return ids

    def encode(self, turns: Sequence[tuple[str, str]], add_generation_prompt: bool = False
               ) -> tuple[np.ndarray, np.ndarray]:
        """(tokens int32, loss_mask bool). With add_generation_prompt the ids end with the assistant header."""
        ids, supervised = list(self.begin()), [False] * len(self.begin())

        def add(piece: list[int], flag: bool):
            ids.extend(piece)
            supervised.extend([flag] * len(piece))

        for role, text in turns:
            if role not in ROLES:
                raise ValueError(f"unknown role '{role}'; turns use {ROLES}")
            answer = role == "assistant"
            add(self.header(role), False)
            add(self.encode_text(text.strip()), answer)
            add(self.end_of_turn(), answer)
        if add_generation_prompt:
            add(self.header("assistant"), False)
        ids = np.asarray(ids, np.int32)
        # An image inside an answer is input, never a target.
        return ids, np.asarray(supervised, bool) & (ids != self.image_id)


@register_template("simple")
class SimpleTemplate(Template):
    """For tokenizers trained by train_sentencepiece:
    <|begin_of_text|><|user|><|image|>What digit is this?<|eot|><|assistant|>7<|eot|>"""

    _ROLE_TOKENS = {"system": tok.SYSTEM, "user": tok.USER, "assistant": tok.ASSISTANT}

    def __init__(self, tokenizer: tok.Tokenizer):
        super().__init__(tokenizer)
        self._bos = tokenizer.bos_id
        self._eot = tokenizer.special_id(tok.EOT)
        self._roles = {role: tokenizer.special_id(t) for role, t in self._ROLE_TOKENS.items()}

    def begin(self):
        return [self._bos]

    def header(self, role):
        return [self._roles[role]]

    def end_of_turn(self):
        return [self._eot]


@register_template("llama3_vision")
class Llama3VisionTemplate(Template):
    """Llama 3.2 Vision chat format (no default system prompt):
    <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n<|image|>Q<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\nA<|eot_id|>"""

    def __init__(self, tokenizer: tok.Tokenizer):
        super().__init__(tokenizer)
        self._bos = tokenizer.bos_id
        self._eot = tokenizer.special_id("<|eot_id|>")
        start, end = tokenizer.special_id("<|start_header_id|>"), tokenizer.special_id("<|end_header_id|>")
        newlines = tokenizer.encode("\n\n")
        self._headers = {role: [start, *tokenizer.encode(role), end, *newlines] for role in ROLES}

    def begin(self):
        return [self._bos]

    def header(self, role):
        return self._headers[role]

    def end_of_turn(self):
        return [self._eot]


def expand_image_tokens(tokens: np.ndarray, loss_mask: np.ndarray, image_id: int,
                        tokens_per_image: int | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Unified (LLaVA) models: repeat the k-th image token tokens_per_image[k] times (an int applies to all),
    so the projected image features can be scattered into those positions."""
    is_image = tokens == image_id
    counts = np.where(is_image, 0, 1)
    counts[is_image] = tokens_per_image
    return np.repeat(tokens, counts), np.repeat(loss_mask, counts)
