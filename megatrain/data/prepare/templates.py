"""SFT templates: a task row → text pieces, each marked as prompt (0) or as the k-th assistant
turn (k >= 1), so that the shard's loss mask is exact at the token level.

The pieces are tokenized one by one and their ids concatenated (``tasks.TaskEncoder``): a piece
boundary is also a token boundary, so no token straddles prompt and target. The ids can differ
from those of the whole text tokenized at once where a merge would have crossed a boundary
(``"\\n"`` + ``"Sure"``); that is the price of exact marking, and what generation sees when it
is prompted with the prompt pieces alone.

- ``plain``: ``prompt + "\\n"`` (0), then ``completion`` (1). A chat row: one line per message,
  ``"<role>: "`` (0) then ``content + "\\n"`` (k for the k-th assistant message, else 0).
- ``alpaca``: the Stanford Alpaca prompt with the instruction (0), then the completion (1). A chat
  row must be exactly one user message then one assistant message (taken as prompt/completion);
  any other conversation is a DataError (Alpaca has no turns).
- ``chat``: the tokenizer's Hugging Face ``chat_template``, rendered by jinja2's
  ``ImmutableSandboxedEnvironment`` as ``transformers`` renders it (a template is data: it can't
  run code). The k-th assistant message's span is found by rendering prefixes: it starts where
  ``messages[:i]`` rendered with the generation prompt ends and stops where ``messages[:i+1]``
  ends, both of which must be prefixes of the whole conversation's rendering. A prompt/completion
  row is the conversation ``[user: prompt, assistant: completion]``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from megatrain.data.tokenizer import HFTokenizer, Tokenizer
from megatrain.data.tokenizer.hf_tokenizer import CONFIG_FILE
from megatrain.errors import ConfigError, DataError

TEMPLATES = ("plain", "alpaca", "chat")
ROLES = ("system", "user", "assistant")
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{prompt}\n\n### Response:\n"
)
CHAT_TEMPLATE_FILE = "chat_template.jinja"

Piece = tuple[str, int]
"""Text and its turn: 0 for prompt/template text, k >= 1 for the k-th assistant message."""
Message = dict[str, str]


class Template(Protocol):
    """Renders a checked sft row (``{"prompt", "completion"}`` or ``{"messages"}``)."""

    def render(self, row: dict[str, Any], where: str) -> list[Piece]:
        """The row's pieces in order (empty pieces left out); DataError naming ``where``."""
        ...


def check_template(name: str) -> str:
    """``name`` if it is a template; a one-line ConfigError listing them otherwise."""
    if name not in TEMPLATES:
        raise ConfigError(f"unknown template {name!r}; valid templates: {', '.join(TEMPLATES)}")
    return name


def _nonempty(pieces: list[Piece]) -> list[Piece]:
    return [p for p in pieces if p[0]]


class PlainTemplate:
    """``prompt\\n`` + completion; chat rows as ``<role>: content`` lines."""

    def render(self, row: dict[str, Any], where: str) -> list[Piece]:
        if "messages" not in row:
            return _nonempty([(row["prompt"] + "\n", 0), (row["completion"], 1)])
        pieces, turn = [], 0
        for message in row["messages"]:
            role = message["role"]
            turn += role == "assistant"
            pieces += [(f"{role}: ", 0), (message["content"] + "\n",
                                          turn if role == "assistant" else 0)]
        return _nonempty(pieces)


class AlpacaTemplate:
    """The Stanford Alpaca prompt (without its ``### Input:`` variant)."""

    def render(self, row: dict[str, Any], where: str) -> list[Piece]:
        prompt, completion = alpaca_pair(row, where)
        return _nonempty([(ALPACA_PROMPT.format(prompt=prompt), 0), (completion, 1)])


def alpaca_pair(row: dict[str, Any], where: str) -> tuple[str, str]:
    """(prompt, completion) of a row for the Alpaca template; DataError for a conversation that
    is not exactly one user message and one assistant message."""
    if "messages" not in row:
        return row["prompt"], row["completion"]
    roles = [m["role"] for m in row["messages"]]
    if roles != ["user", "assistant"]:
        raise DataError(f"{where}: the alpaca template takes one user message then one assistant "
                        f"message, not {'/'.join(roles)}; use --template chat or plain")
    return row["messages"][0]["content"], row["messages"][1]["content"]


class ChatTemplate:
    """A Hugging Face chat template with the tokenizer's special tokens (``bos_token`` …)."""

    def __init__(self, source: str, special_tokens: dict[str, str]) -> None:
        self.source, self.special_tokens = source, special_tokens
        self._compiled: Any = None  # compiled on first use (in each worker process)

    def render(self, row: dict[str, Any], where: str) -> list[Piece]:
        messages = row.get("messages") or [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["completion"]},
        ]
        full = self.text(messages, False, where)
        pieces: list[Piece] = []
        at = turn = 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            turn += 1
            start = self._prefix(messages[:i], True, full, where, f"up to assistant message {turn}")
            end = self._prefix(messages[: i + 1], False, full, where,
                               f"through assistant message {turn}")
            if start < at or end < start:
                raise DataError(f"{where}: the chat template renders assistant message {turn} "
                                "out of order; its turns can't be marked")
            pieces += [(full[at:start], 0), (full[start:end], turn)]
            at = end
        pieces.append((full[at:], 0))
        return _nonempty(pieces)

    def text(self, messages: Sequence[Message], add_generation_prompt: bool, where: str) -> str:
        """The template rendered for ``messages``; DataError naming ``where`` if it fails."""
        import jinja2

        try:
            return self._template().render(messages=[dict(m) for m in messages],
                                           add_generation_prompt=add_generation_prompt,
                                           **self.special_tokens)
        except jinja2.TemplateError as exc:  # raise_exception(...) and sandbox violations
            raise DataError(f"{where}: the chat template failed: {exc}") from exc
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
            raise DataError(f"{where}: the chat template failed: {exc!r}") from exc

    def _prefix(self, messages: Sequence[Message], add_generation_prompt: bool, full: str,
                where: str, what: str) -> int:
        """The length of ``messages``' rendering, which must begin the whole conversation's."""
        text = self.text(messages, add_generation_prompt, where)
        if not full.startswith(text):
            raise DataError(f"{where}: the chat template's rendering of the conversation {what} "
                            "is not a prefix of the whole conversation's, so the assistant turns "
                            "can't be marked; use --template plain or alpaca")
        return len(text)

    def _template(self) -> Any:
        if self._compiled is None:
            self._compiled = compile_chat_template(self.source)
        return self._compiled

    def __getstate__(self) -> dict[str, Any]:  # sent to worker processes without the compiled
        return {"source": self.source, "special_tokens": self.special_tokens, "_compiled": None}


def compile_chat_template(source: str) -> Any:
    """``source`` compiled as ``transformers`` compiles chat templates: a sandboxed, immutable
    jinja2 environment with ``trim_blocks``/``lstrip_blocks``, ``loopcontrols``, the
    ``{% generation %}`` tag (rendered as its body), ``raise_exception`` and a ``tojson`` that keeps
    non-ASCII text. ``strftime_now`` is left undefined: a template that reads the clock would make
    the shards depend on the day they were prepared (templates fall back to a fixed date)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """``{% generation %}…{% endgeneration %}`` (transformers' assistant-mask markers)."""

        tags = frozenset({"generation"})

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(
                lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise DataError(f"the chat template does not parse: {exc} (line {exc.lineno})") from exc


def chat_template_source(tok: Tokenizer) -> str:
    """The tokenizer's chat template: ``chat_template.jinja`` beside its ``tokenizer.json``, else
    ``tokenizer_config.json``'s ``chat_template`` (the "default" one of a named list), else a
    ``chat_template`` in the tokenizer.json itself; a one-line DataError when there is none."""
    if not isinstance(tok, HFTokenizer):
        raise DataError(f"--template chat: {tok.path} is a SentencePiece model, which has no "
                        "chat_template; give a tokenizer.json that has one, or use --template "
                        "plain or alpaca")
    folder = tok.path.parent
    if (folder / CHAT_TEMPLATE_FILE).is_file():
        return (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    for file in (folder / CONFIG_FILE, tok.path):
        template = _json_chat_template(file) if file.is_file() else None
        if template:
            return template
    raise DataError(f"--template chat: {tok.path} has no chat_template (looked in "
                    f"{CHAT_TEMPLATE_FILE}, {CONFIG_FILE} and the tokenizer.json); use --template "
                    "plain or alpaca")


def _json_chat_template(file: Path) -> str | None:
    try:
        template = json.loads(file.read_text(encoding="utf-8")).get("chat_template")
    except (ValueError, AttributeError) as exc:
        raise DataError(f"{file} is not a JSON object: {exc}") from exc
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def chat_template(tok: Tokenizer) -> ChatTemplate:
    """The tokenizer's chat template with its special tokens as ``transformers`` passes them
    (``bos_token``, ``eos_token`` …)."""
    roles = tok.roles if isinstance(tok, HFTokenizer) else {}
    return ChatTemplate(chat_template_source(tok), {f"{r}_token": t for r, t in roles.items()})


def template_digest(template: Template) -> str | None:
    """What of a template is not in its name (a chat template's text and special tokens), hashed
    for the resume fingerprint; None for the built-in ones."""
    if not isinstance(template, ChatTemplate):
        return None
    state = json.dumps([template.source, template.special_tokens], sort_keys=True)
    return hashlib.sha256(state.encode()).hexdigest()


def prompt_pieces(template: Template, prompt: str) -> list[str]:
    """The pieces a model fine-tuned with ``template`` reads before its answer to ``prompt``
    (generation's input: tokenize each piece on its own, as training did)."""
    pieces = template.render({"prompt": prompt, "completion": "."}, "the prompt")
    return [text for text, _ in itertools.takewhile(lambda piece: piece[1] == 0, pieces)]


def make_template(name: str, tok: Tokenizer | None) -> Template:
    """The named template; ``chat`` reads ``tok``'s chat_template (a given tokenizer is needed)."""
    check_template(name)
    if name == "plain":
        return PlainTemplate()
    if name == "alpaca":
        return AlpacaTemplate()
    if tok is None:
        raise ConfigError("--template chat renders with the chat_template of a given tokenizer: "
                          "add --tokenizer (a tokenizer.json that has one)")
    return chat_template(tok)
