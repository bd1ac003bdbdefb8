"""Chat templates: a list of {"role", "content"} messages -> the prompt a chat model expects.

    prompt = render_chat(messages, "gemma")          # or template_for(config.family)
    ids = prompt.encode(tokenizer)                    # special markers become their ids
    prompt.text                                       # the same prompt as one string
    prompt.stop_strings, prompt.stop_ids(tokenizer)   # where a reply ends

A rendered prompt is a sequence of segments: plain text, or `Special` markers (BOS, turn or
header tokens) that are encoded as single token ids — BOS / EOS as the tokenizer's bos / eos
ids, the others looked up by piece name — never by running the marker text through the
tokenizer (a SentencePiece model never matches CONTROL pieces in text). `text` joins everything, with the markers spelled as their pieces, which is what
transformers' `apply_chat_template(..., tokenize=False)` returns for these templates.

Templates (the formats of the released instruction-tuned checkpoints):

  gemma    <bos><start_of_turn>user\\n{u}<end_of_turn>\\n<start_of_turn>model\\n{a}<end_of_turn>\\n
           ... <start_of_turn>model\\n  (role "assistant" is written "model"; contents are
           stripped; Gemma has no system role: a system message is prepended to the first user
           turn followed by a blank line, as the Gemma 3 template does). Stop: <end_of_turn>,
           <eos>.
  llama2   <s>[INST] <<SYS>>\\n{s}\\n<</SYS>>\\n\\n{u} [/INST] {a} </s><s>[INST] {u} [/INST]
           (Llama-2-chat; Code Llama Instruct). Stop: </s>.
  mistral  <s>[INST] {u} [/INST]{a}</s>[INST] {u} [/INST]  (Mistral-7B-Instruct v0.1; a system
           message is prepended to the first user turn with a blank line). Stop: </s>.
  llama3   <|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\\n\\n{c}<|eot_id|> ...
           <|start_header_id|>assistant<|end_header_id|>\\n\\n  (Llama 3 instruct; contents are
           stripped; 3.1's default "Cutting Knowledge Date" system message is not added).
           Stop: <|eot_id|>, <|end_of_text|>.
  chatml   <|im_start|>{role}\\n{c}<|im_end|>\\n ... <|im_start|>assistant\\n  (Qwen 2 / 2.5 / 3;
           no BOS). Qwen 2.5's default system prompt is not added: pass one explicitly.
           Stop: <|im_end|>, <|endoftext|>.

Messages must alternate user / assistant after an optional leading system message (every
template here assumes it); a violation raises ValueError naming the message index.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

TEMPLATES = ("gemma", "llama2", "mistral", "llama3", "chatml")
FAMILY_TEMPLATES = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "llama": "llama2",
                    "mistral": "mistral", "qwen2": "chatml", "qwen3": "chatml"}
ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class Special:
    """A special token, named by its piece (e.g. "<start_of_turn>"); `kind` "bos" / "eos"
    resolves to the tokenizer's own bos / eos id whatever its piece is called."""

    piece: str
    kind: str = ""

    def id(self, tokenizer: Any) -> int:
        if self.kind == "bos":
            return int(tokenizer.bos_id)
        if self.kind == "eos":
            return int(tokenizer.eos_id)
        return special_id(tokenizer, self.piece)


Segment = str | Special
BOS_GEMMA = Special("<bos>", "bos")


@dataclasses.dataclass(frozen=True)
class ChatPrompt:
    """A rendered conversation: segments plus where the model's reply stops."""

    segments: tuple[Segment, ...]
    stops: tuple[Special, ...]

    @property
    def text(self) -> str:
        """The prompt as one string, special tokens spelled as their pieces."""
        return "".join(s.piece if isinstance(s, Special) else s for s in self.segments)

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """The stop markers as strings (for samplers that match decoded text)."""
        return tuple(s.piece for s in self.stops)

    def encode(self, tokenizer: Any) -> list[int]:
        """Token ids: text segments through `tokenizer.encode`, specials by piece lookup."""
        ids: list[int] = []
        for seg in self.segments:
            if isinstance(seg, Special):
                ids.append(seg.id(tokenizer))
            elif seg:
                ids.extend(tokenizer.encode(seg))
        return ids

    def stop_ids(self, tokenizer: Any) -> list[int]:
        """Ids of the stop markers the tokenizer has (eos by id; at least one must exist)."""
        out = []
        for stop in self.stops:
            try:
                i = stop.id(tokenizer)
            except KeyError:
                continue
            if i not in out:
                out.append(i)
        if not out:
            raise KeyError(f"the tokenizer has none of the stop pieces {self.stop_strings}")
        return out


def special_id(tokenizer: Any, piece: str) -> int:
    """The id of a special piece; KeyError if the tokenizer lacks it (maps it to unk)."""
    i = int(tokenizer.piece_to_id(piece))
    unk = getattr(tokenizer, "unk_id", None)
    if i == unk and tokenizer.id_to_piece(i) != piece:
        raise KeyError(f"tokenizer has no piece {piece!r}")
    return i


def template_for(family: str) -> str:
    """The chat template of a model family (`ModelConfig.family`)."""
    if family not in FAMILY_TEMPLATES:
        raise ValueError(f"no chat template for family {family!r}; known: "
                         f"{sorted(FAMILY_TEMPLATES)}")
    return FAMILY_TEMPLATES[family]


def _validate(messages: Sequence[Mapping[str, str]]) -> list[tuple[str, str]]:
    """(role, content) pairs; roles alternate user/assistant after an optional system."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be a mapping with 'role' and 'content', got {m!r}")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise ValueError(f"message {i}: role {role!r} is not one of {ROLES}")
        if not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a str, got {type(content).__name__}")
        out.append((role, content))
    if not out:
        raise ValueError("no messages to render")
    body = out[1:] if out[0][0] == "system" else out
    for j, (role, _) in enumerate(body):
        want = "user" if j % 2 == 0 else "assistant"
        if role != want:
            idx = j + (len(out) - len(body))
            raise ValueError(f"message {idx}: expected role {want!r} (after an optional system "
                             f"message, roles alternate user/assistant), got {role!r}")
    return out


def _merge_system(turns: list[tuple[str, str]], sep: str = "\n\n") -> list[tuple[str, str]]:
    """Prepend a leading system message to the first user turn (templates without system)."""
    if turns[0][0] != "system":
        return turns
    system, rest = turns[0][1], turns[1:]
    if not rest:
        return [("user", system)]
    return [("user", system + sep + rest[0][1])] + rest[1:]


def render_chat(messages: Sequence[Mapping[str, str]], template: str = "gemma", *,
                add_generation_prompt: bool = True, add_bos: bool = True) -> ChatPrompt:
    """Render `messages` with `template` (see the module docstring for the formats).

    Args:
      messages: [{"role": "system"|"user"|"assistant", "content": str}, ...].
      template: one of TEMPLATES.
      add_generation_prompt: end with the opening of the assistant's turn (gemma, llama3,
        chatml; the [INST] formats have no such opening).
      add_bos: start with the BOS special token (for chatml there is none).
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; known: {TEMPLATES}")
    turns = _validate(messages)
    segs: list[Segment] = []
    gen = add_generation_prompt
    if template == "gemma":
        if add_bos:
            segs.append(BOS_GEMMA)
        if turns[0][0] == "system" and len(turns) == 1:  # a lone system message is the prompt
            turns = [("user", turns[0][1])]
        prefix = turns[0][1] + "\n\n" if turns[0][0] == "system" else ""
        for j, (role, content) in enumerate(turns[1:] if prefix else turns):
            text = (prefix if j == 0 else "") + content.strip()
            segs += [Special("<start_of_turn>"), ("model" if role == "assistant" else role)
                     + "\n" + text, Special("<end_of_turn>"), "\n"]
        if gen:
            segs += [Special("<start_of_turn>"), "model\n"]
        stops = (Special("<end_of_turn>"), Special("<eos>", "eos"))
    elif template == "llama2":
        system = turns[0][1] if turns[0][0] == "system" else None
        body = turns[1:] if system is not None else turns
        for j in range(0, len(body), 2):
            user = body[j][1]
            if j == 0 and system is not None:
                user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}"
            if add_bos or j > 0:
                segs.append(Special("<s>", "bos"))
            segs.append(f"[INST] {user.strip()} [/INST]")
            if j + 1 < len(body):
                segs += [f" {body[j + 1][1].strip()} ", Special("</s>", "eos")]
        stops = (Special("</s>", "eos"),)
    elif template == "mistral":
        if add_bos:
            segs.append(Special("<s>", "bos"))
        for role, content in _merge_system(turns):
            if role == "user":
                segs.append(f"[INST] {content} [/INST]")
            else:
                segs += [content, Special("</s>", "eos")]
        stops = (Special("</s>", "eos"),)
    elif template == "llama3":
        if add_bos:
            segs.append(Special("<|begin_of_text|>", "bos"))
        for role, content in turns:
            segs += [Special("<|start_header_id|>"), role, Special("<|end_header_id|>"),
                     "\n\n" + content.strip(), Special("<|eot_id|>")]
        if gen:
            segs += [Special("<|start_header_id|>"), "assistant", Special("<|end_header_id|>"),
                     "\n\n"]
        stops = (Special("<|eot_id|>"), Special("<|end_of_text|>", "eos"))
    else:  # chatml
        for role, content in turns:
            segs += [Special("<|im_start|>"), f"{role}\n{content}", Special("<|im_end|>"), "\n"]
        if gen:
            segs += [Special("<|im_start|>"), "assistant\n"]
        stops = (Special("<|im_end|>"), Special("<|endoftext|>"))
    return ChatPrompt(tuple(segs), stops)
