"""The interactive side of ``scratchlm chat``: a conversation that remembers, within the context window.

Lines starting with ``/`` are commands: ``/help`` lists them, ``/reset`` forgets the conversation,
``/system TEXT`` sets the system prompt (and resets), ``/exit`` quits. Anything else is the user's next
message; the reply streams back. With piped stdin, each line is one message, so
``echo "hi" | scratchlm chat MODEL`` works.
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

    def fit_history(self) -> int:
        """Drop the oldest exchanges until prompt + reply budget fit the context; returns how many dropped."""
        budget = self.sampling.get("max_new_tokens", DEFAULT_SAMPLING["max_new_tokens"])
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
        for chunk in self.llm.stream(self.messages(), **self.sampling):
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
