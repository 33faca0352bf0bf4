"""Prompt ids for video generation: the base model's chat template, user = the text, assistant opens a video.

A sequence is ``build_prompt_ids(...)`` (ends with ``<|video_start|>``) + N code ids + ``<|video_end|>`` (+ the
tokenizer's eos when training). The template is versioned by ``vocab.TEMPLATE_VERSION`` (recorded in
video_vocab.json); changing this file's output changes what a trained model expects.

User text (a class name, a caption, a chat line) is data, never markup: every way text becomes ids goes through
`PromptEncoder`, so a text that contains ``<|video_start|>``, ``<|larp_00001|>``, ``<|im_end|>``, the eos string or
any other control token string is encoded as those characters, and the only control ids in a prompt are the ones
the chat template writes itself. Ordinary text gives exactly the ids of tokenizing the rendered template (the
encoding every model so far was trained with); only a text that would have produced a control id takes the
sanitised path (transformers' ``apply_chat_template(..., sanitize_control_tokens=True)``), and the result is checked.
"""
from __future__ import annotations

import re
from typing import Any

from .vocab import VIDEO_UNCOND, VideoVocab

PLAIN_TEMPLATE = "User: {text}\nAssistant:"
# PLAIN_TEMPLATE as a Jinja chat template (renders the same string), for the sanitised path of tokenizers without one
_PLAIN_CHAT_TEMPLATE = "User: {{ messages[0]['content'] }}\nAssistant:"
_SKELETON_TEXT = "video"  # plain user text: its prompt holds only the template's own control tokens


def class_name_to_text(name: str) -> str:
    """A dataset class name as plain words: 'ApplyEyeMakeup' -> 'apply eye makeup', 'air_drumming' -> 'air drumming'."""
    words = re.sub(r"[_\-]+", " ", name)
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", words)
    return " ".join(words.lower().split())


class PromptEncoder:
    """Generation prompts of one tokenizer: ``encoder(text)`` -> ids ending with ``vocab.video_start_id``.

    Args:
        tokenizer: the extended tokenizer (holds the video tokens).
        vocab: the layout; ids from ``vocab.text_vocab_size`` on (video and filler tokens) always count as control ids.

    Control ids are the tokenizer's special tokens (bos / eos / pad / unk, the chat markers, every video token) and
    the added tokens the chat template writes. After sanitising, an unknown-token id is accepted when the unknown
    token has no other role: it then stands for characters the vocabulary cannot spell (transformers itself refuses
    a control string that plain text turns back into its own id). Build one encoder for many texts: collecting the
    control ids reads the whole added vocabulary (~25 ms with 8192 code tokens).
    """

    def __init__(self, tokenizer: Any, vocab: VideoVocab):
        self.tokenizer, self.vocab = tokenizer, vocab
        self.chat_template = getattr(tokenizer, "chat_template", None) or None
        template_text = self.chat_template or PLAIN_TEMPLATE
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        control = {int(i) for i, tok in added.items()
                   if tok.special or (tok.content in template_text and not tok.content.isspace())}
        control |= {int(i) for i in getattr(tokenizer, "all_special_ids", ()) or ()}
        unk = getattr(tokenizer, "unk_token_id", None)
        roles = {getattr(tokenizer, f"{r}_token_id", None) for r in ("bos", "eos", "pad", "sep", "cls", "mask")}
        self._control = frozenset(control)
        self._plain_unk = int(unk) if unk is not None and unk not in roles else None  # unk of unspellable text
        self._skeleton = self._control_ids(self._template_ids(_SKELETON_TEXT))

    def __call__(self, text: str | None) -> list[int]:
        """Ids of the prompt for `text` (None -> the unconditional prompt ``<|video_uncond|>``), + video_start."""
        if text is None:  # the one trusted user turn: the unconditional control token itself
            return self._template_ids(VIDEO_UNCOND) + [self.vocab.video_start_id]
        return self.user_ids(str(text)) + [self.vocab.video_start_id]

    def user_ids(self, text: str) -> list[int]:
        """Ids of the chat prompt with `text` as the user turn, the text always encoded as plain characters."""
        ids = self._template_ids(text)
        if self._plain(ids):
            return ids  # no control string in the text: exactly the template's ordinary tokenization
        ids = self._sanitized_ids(text)  # the same ids when only unspellable text (unk) failed the check above
        if not self._plain(ids, unk_is_text=True):
            raise ValueError(f"cannot encode the prompt text {text!r:.120} as plain text with this tokenizer: a "
                             "control token survives sanitising; remove control token strings from the text")
        return ids

    def is_control_id(self, token_id: int) -> bool:
        return token_id in self._control or token_id >= self.vocab.text_vocab_size

    # ---- internals ----
    def _control_ids(self, ids: list[int]) -> list[int]:
        return [i for i in ids if self.is_control_id(i)]

    def _plain(self, ids: list[int], unk_is_text: bool = False) -> bool:
        """True when the only control ids in `ids` are the template's own (those of a plain user text)."""
        control, skeleton = self._control_ids(ids), self._skeleton
        if unk_is_text and self._plain_unk is not None:
            control, skeleton = ([i for i in x if i != self._plain_unk] for x in (control, skeleton))
        return control == skeleton

    def _template_ids(self, user: str) -> list[int]:
        """The ordinary encoding: render the template around `user`, tokenize the string (control strings parse)."""
        tok = self.tokenizer
        if self.chat_template:
            rendered = tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                               tokenize=False)
            return [int(i) for i in tok(rendered, add_special_tokens=False)["input_ids"]]
        return [int(i) for i in tok(PLAIN_TEMPLATE.format(text=user), add_special_tokens=True)["input_ids"]]

    def _sanitized_ids(self, text: str) -> list[int]:
        """transformers' sanitised chat encoding: control strings in `text` become plain text, the template's stay."""
        tok = self.tokenizer
        messages = [{"role": "user", "content": text}]
        if self.chat_template:
            return [int(i) for i in tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                            sanitize_control_tokens=True, return_dict=False)]
        body = tok.apply_chat_template(messages, chat_template=_PLAIN_CHAT_TEMPLATE, tokenize=True,
                                       sanitize_control_tokens=True, return_dict=False)
        lead, trail = self._added_around()  # what add_special_tokens=True puts around the plain template (e.g. bos)
        return lead + [int(i) for i in body] + trail

    def _added_around(self) -> tuple[list[int], list[int]]:
        probe = PLAIN_TEMPLATE.format(text=_SKELETON_TEXT)
        with_special = [int(i) for i in self.tokenizer(probe, add_special_tokens=True)["input_ids"]]
        without = [int(i) for i in self.tokenizer(probe, add_special_tokens=False)["input_ids"]]
        for k in range(len(with_special) - len(without) + 1):
            if with_special[k:k + len(without)] == without:
                return with_special[:k], with_special[k + len(without):]
        raise ValueError("cannot tell which special tokens the tokenizer adds around a prompt")


def build_prompt_ids(tokenizer: Any, vocab: VideoVocab, text: str | None) -> list[int]:
    """Token ids of a generation prompt, ending with ``vocab.video_start_id`` (`PromptEncoder` for one text).

    Args:
        tokenizer: the extended tokenizer (holds the video tokens).
        vocab: the layout (``video_start_id``; ids from ``text_vocab_size`` on are control ids).
        text: the user turn (class name or caption), always plain text; None -> the unconditional prompt
            ``<|video_uncond|>``.

    Uses the tokenizer's chat template with one user message and the assistant turn opened; a tokenizer without a
    chat template gets ``"User: {text}\\nAssistant:"`` with its usual special tokens (e.g. bos).
    """
    return PromptEncoder(tokenizer, vocab)(text)
