"""The interactive side of ``scratchlm chat``: a conversation that remembers, within the context window.

Lines starting with ``/`` are commands: ``/help`` lists them, ``/reset`` forgets the conversation,
``/system TEXT`` sets the system prompt (and resets), ``/exit`` quits. Anything else is the user's next
message; the reply streams back. With piped stdin, each line is one message, so
``echo "hi" | scratchlm chat MODEL`` works.

The conversation is sent whole each turn, so the oldest exchanges are dropped when it outgrows the context window.
Without a context shift a reply must fit beside the prompt, so exchanges go until prompt + ``max_new_tokens`` fit.
With ``--context-shift`` a reply makes its own room as it grows, so exchanges go only when the prompt itself does not
fit: the model sees as much of the conversation as the window holds, and a long reply shifts (drops the oldest
half of the tokens after ``keep``). Unless ``--keep`` says otherwise, a shift keeps the conversation's head: the
system prompt (the template's default one too) and the opener of the first user turn.
"""

from __future__ import annotations

from typing import TextIO

from scratchlm.llm import LLM
from scratchlm.sampling import DEFAULT_SAMPLING

HELP = """commands:
  /help          show this list
  /reset         forget the conversation (the system prompt stays)
  /system TEXT   set the system prompt and start over (/system alone removes it)
  /exit          quit (Ctrl-D too)"""


class ChatSession:
    """A conversation with an LLM; ``run`` drives it from a text stream."""

    def __init__(self, llm: LLM, system: str | None = None, sampling: dict | None = None):
        self.llm = llm
        self.system = system
        self.sampling = dict(sampling or {})
        self.history: list[dict] = []

    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    @property
    def shifting(self) -> bool:
        """Whether replies go on past the context window (``context_shift`` or ``keep`` in the sampling options)."""
        return bool(self.sampling.get("context_shift")) or self.sampling.get("keep") is not None

    def head_tokens(self) -> int:
        """Tokens of the conversation's head, which every turn starts with: the rendered system prompt (or the one
        the template adds by default) and the opener of the first user message. Measured as the token prefix that
        two conversations differing only in the first user message share, so any chat template works."""
        head = self.messages()[: 1 if self.system else 0]
        a = self.llm.encode_chat(head + [{"role": "user", "content": "a"}])
        b = self.llm.encode_chat(head + [{"role": "user", "content": "b"}])
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    def options(self) -> dict:
        """The generation options of the next reply: the session's, and with a context shift but no ``keep``,
        ``keep`` = the conversation's head (at most half the window, as a shift must free room)."""
        options = dict(self.sampling)
        if self.shifting and options.get("keep") is None:
            options["keep"] = min(self.head_tokens(), self.llm.config.context_length // 2)
        return options

    def fit_history(self) -> int:
        """Drop the oldest exchanges until the prompt and the room a reply needs fit the context: the whole
        ``max_new_tokens``, or with a context shift a single token (the reply shifts as it grows). Returns how many
        exchanges were dropped."""
        budget = 1 if self.shifting else self.sampling.get("max_new_tokens", DEFAULT_SAMPLING["max_new_tokens"])
        limit = self.llm.config.context_length
        dropped = 0
        while len(self.history) > 1 and len(self.llm.encode_chat(self.messages())) + budget > limit:
            # Drop one user/assistant pair from the front, keeping the conversation starting with a user turn.
            self.history = self.history[2:] if len(self.history) > 2 else self.history[1:]
            dropped += 1
        return dropped

    def reply(self, text: str, out: TextIO) -> str:
        """Send one user message; stream the reply to ``out`` and remember it."""
        self.history.append({"role": "user", "content": text})
        self.fit_history()
        pieces = []
        for chunk in self.llm.stream(self.messages(), **self.options()):
            pieces.append(chunk)
            out.write(chunk)
            out.flush()
        out.write("\n")
        answer = "".join(pieces)
        self.history.append({"role": "assistant", "content": answer})
        return answer

    def run(self, stdin: TextIO, out: TextIO) -> None:
        interactive = stdin.isatty()
        if interactive:
            out.write(f"chatting with {self.llm.name}; /help lists the commands, /exit quits\n")
        while True:
            if interactive:
                out.write(">>> ")
                out.flush()
            line = stdin.readline()
            if not line:
                break
            text = line.rstrip("\n")
            if not text.strip():
                continue
            if text.startswith("/"):
                command, _, arg = text.partition(" ")
                if command in ("/exit", "/quit", "/bye"):
                    break
                if command in ("/help", "/?"):
                    out.write(HELP + "\n")
                elif command == "/reset":
                    self.history = []
                    out.write("(conversation reset)\n")
                elif command == "/system":
                    self.system, self.history = (arg.strip() or None), []
                    out.write("(system prompt set; conversation reset)\n")
                else:
                    out.write(f"unknown command {command}\n{HELP}\n")
                continue
            self.reply(text, out)
