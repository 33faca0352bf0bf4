"""Prompt ids: the base model's chat template, a user turn of text and videos, the assistant turn opened.

A video answer is ``encoder(prompt)`` (ends with ``<|video_start|>``) + N code ids + ``<|video_end|>`` (+ the
tokenizer's eos when training); a text answer follows ``encoder.turn_ids(parts)`` and ends with the eos.

Format (``vocab.TEMPLATE_VERSION``, recorded in video_vocab.json; changing this file's output changes what a
trained model expects):
- version 1, a text-only user turn: the tokenization of the rendered template around the text, as one string.
  Version 2 keeps it unchanged, so every text-to-video model trained so far reads its prompts as before.
- version 2, a user turn with videos: ``parts`` is a list of texts and `VideoSegment`s, encoded as
  ``ids(prefix) + [part ids ...] + ids(suffix)`` where prefix / suffix are the rendered template before and after
  the user content (tokenized on their own), a text part is its plain tokenization, and a video part is
  ``<|video_start|> N code ids <|video_end|>``. ``encoder.parse(ids)`` turns such ids back into the parts.

User text (a class name, a caption, a question, a chat line) is data, never markup: every way text becomes ids goes
through `PromptEncoder`, so a text that contains ``<|video_start|>``, ``<|larp_00001|>``, ``<|im_end|>``, the eos
string or any other control token string is encoded as those characters, and the only control ids in a prompt are
the ones the chat template writes itself (and the video segments given as `VideoSegment`). Ordinary text gives
exactly the ids of tokenizing the rendered template; only a text that would have produced a control id takes the
sanitised path (transformers' ``apply_chat_template(..., sanitize_control_tokens=True)``), and the result is checked.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence, Union

import torch

from .vocab import VIDEO_UNCOND, VideoVocab

PLAIN_TEMPLATE = "User: {text}\nAssistant:"
# PLAIN_TEMPLATE as a Jinja chat template (renders the same string), for the sanitised path of tokenizers without one
_PLAIN_CHAT_TEMPLATE = "User: {{ messages[0]['content'] }}\nAssistant:"
_SKELETON_TEXT = "video"  # plain user text: its prompt holds only the template's own control tokens
_CONTENT_MARK = "@@larp-user-content@@"  # where the template puts the user content (split out of the rendered text)
VIDEO_TEMPLATE_VERSION = 2  # the first template version whose user turns may hold videos


@dataclass(frozen=True, eq=False)
class VideoSegment:
    """A video inside a user turn, as its LARP codes: (N,) integers in [0, K) (written as
    ``<|video_start|> N code tokens <|video_end|>``)."""

    codes: torch.Tensor

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VideoSegment) and torch.equal(self.codes.long(), other.codes.long())


Part = Union[str, VideoSegment]
Prompt = Union[str, None, Sequence[Part]]  # text, the unconditional prompt, or a user turn of texts and videos


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
        self._frame: tuple[list[int], list[int]] | None = None  # ids around a turn with videos, made on first use

    def __call__(self, prompt: Prompt) -> list[int]:
        """Ids of a video-answer prompt, ending with video_start: `prompt` is a text, None (the unconditional
        prompt ``<|video_uncond|>``) or a list of texts and `VideoSegment`s (one user turn)."""
        if prompt is None:  # the one trusted user turn: the unconditional control token itself
            return self._template_ids(VIDEO_UNCOND) + [self.vocab.video_start_id]
        return self.turn_ids(prompt) + [self.vocab.video_start_id]

    def turn_ids(self, prompt: str | Sequence[Part]) -> list[int]:
        """Ids of the chat prompt with `prompt` as the user turn and the assistant turn opened (a text answer
        follows these ids). A turn of texts only is encoded as one text (format version 1)."""
        parts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not parts:
            raise ValueError("a prompt needs at least one part (a text or a VideoSegment)")
        bad = [type(p).__name__ for p in parts if not isinstance(p, (str, VideoSegment))]
        if bad:
            raise TypeError(f"prompt parts must be str or VideoSegment, got {bad[0]}")
        if all(isinstance(p, str) for p in parts):
            return self.user_ids("".join(parts))
        if self.vocab.template_version < VIDEO_TEMPLATE_VERSION:
            raise ValueError(f"this model was trained with prompt template version {self.vocab.template_version} "
                             f"(text only); videos in a prompt need version >= {VIDEO_TEMPLATE_VERSION}: train it "
                             "again with this larp-mllm")
        prefix, suffix = self._turn_frame()
        ids = list(prefix)
        for part in parts:
            ids += self.video_ids(part) if isinstance(part, VideoSegment) else self.text_ids(part)
        return ids + suffix

    def video_ids(self, segment: VideoSegment) -> list[int]:
        """``<|video_start|> code ids <|video_end|>`` of one segment (its codes checked: (N,) in [0, K))."""
        codes = torch.as_tensor(segment.codes)
        if codes.dim() != 1:
            raise ValueError(f"a VideoSegment holds the (N,) codes of one video, got shape {tuple(codes.shape)}")
        body = self.vocab.codes_to_ids(codes).tolist()
        return [self.vocab.video_start_id] + body + [self.vocab.video_end_id]

    def text_ids(self, text: str) -> list[int]:
        """Plain ids of a text inside a turn or an answer: control strings in it are encoded as characters."""
        tok = self.tokenizer
        ids = [int(i) for i in tok(text, add_special_tokens=False)["input_ids"]]
        if any(self.is_control_id(i) for i in ids):
            ids = [int(i) for i in tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]]
            control = [i for i in ids if self.is_control_id(i) and i != self._plain_unk]
            if control:
                raise ValueError(f"cannot encode the text {text!r:.120} as plain text with this tokenizer: control "
                                 f"id {control[0]} survives; remove control token strings from the text")
        return ids

    def parse(self, ids: Sequence[int]) -> list[Part]:
        """The user turn of a prompt made by this encoder, as parts (the inverse of `turn_ids` / ``__call__``).

        Texts come back as the tokenizer decodes them (exact for ordinary text; SentencePiece drops a leading
        space of a text part). A trailing ``<|video_start|>`` (a video-answer prompt) is allowed. Raises
        ValueError when the ids are not a prompt of this template or a video segment is not N codes.
        """
        v = self.vocab
        ids = [int(i) for i in ids]
        if ids and ids[-1] == v.video_start_id:
            ids = ids[:-1]
        if ids == self._template_ids(VIDEO_UNCOND):
            return []  # the unconditional prompt
        before, after = self._turn_frame()
        if len(ids) >= len(before) + len(after) and ids[:len(before)] == before and ids[len(ids) - len(after):] == after:
            return self._parse_content(ids[len(before):len(ids) - len(after)])  # a turn with videos (version 2)
        if not self.chat_template:  # the special tokens the tokenizer adds around the plain template (e.g. bos)
            lead, trail = self._added_around()
            if ids[:len(lead)] != lead or ids[len(ids) - len(trail):] != trail:
                raise ValueError("the ids are not a prompt of this tokenizer's template (its special tokens are "
                                 "missing)")
            ids = ids[len(lead):len(ids) - len(trail)]
        video = [i for i in ids if i >= v.text_vocab_size]
        if video:
            raise ValueError(f"id {video[0]} (a video / control token) outside a video segment of the user turn")
        text, (prefix, suffix) = self.tokenizer.decode(ids), self._frame_text()  # a text-only turn (version 1)
        if not (text.startswith(prefix) and text.endswith(suffix)) or len(text) < len(prefix) + len(suffix):
            raise ValueError("the ids are not a prompt of this tokenizer's template (its user-turn frame is missing)")
        text = text[len(prefix):len(text) - len(suffix)]
        return [text]

    def _parse_content(self, ids: list[int]) -> list[Part]:
        """The user content of a version-2 turn -> texts (decoded run by run) and video segments."""
        v = self.vocab
        parts: list[Part] = []
        run: list[int] = []
        i = 0
        while i < len(ids):
            if ids[i] != v.video_start_id:
                if ids[i] >= v.text_vocab_size:
                    raise ValueError(f"position {i} of the user content: a code or video control token outside a "
                                     "video segment")
                run.append(ids[i])
                i += 1
                continue
            end = i + 1 + v.num_video_tokens
            if end >= len(ids) or ids[end] != v.video_end_id:
                raise ValueError(f"position {i} of the user content: a video segment must be <|video_start|>, "
                                 f"{v.num_video_tokens} codes, <|video_end|>")
            if run:
                parts.append(self.tokenizer.decode(run))
            parts.append(VideoSegment(v.ids_to_codes(torch.tensor(ids[i + 1:end]))))
            run, i = [], end + 1
        if run:
            parts.append(self.tokenizer.decode(run))
        return parts

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
    def _frame_text(self) -> tuple[str, str]:
        """The rendered template before and after the user content (plain template: without bos / eos)."""
        if self.chat_template:
            rendered = self.tokenizer.apply_chat_template([{"role": "user", "content": _CONTENT_MARK}],
                                                          add_generation_prompt=True, tokenize=False)
        else:
            rendered = PLAIN_TEMPLATE.format(text=_CONTENT_MARK)
        if rendered.count(_CONTENT_MARK) != 1:
            raise ValueError("the chat template does not write the user content once, as given; videos cannot be "
                             "placed in its user turn")
        prefix, suffix = rendered.split(_CONTENT_MARK)
        return prefix, suffix

    def _turn_frame(self) -> tuple[list[int], list[int]]:
        """Ids before and after the user content of a turn with videos (format version 2)."""
        if self._frame is not None:
            return self._frame
        prefix, suffix = self._frame_text()
        tok = self.tokenizer
        before = [int(i) for i in tok(prefix, add_special_tokens=False)["input_ids"]]  # the template's markup
        after = [int(i) for i in tok(suffix, add_special_tokens=False)["input_ids"]]
        if not self.chat_template:
            lead, trail = self._added_around()
            before, after = lead + before, after + trail
        self._frame = (before, after)
        return self._frame

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
