"""The ReAct loop: the model thinks, calls a tool, reads what came back, and goes on until it answers.

    agent = Agent(llm, tools=[calculator, FileReader("notes/").tool()], max_steps=6)
    result = agent.run("What is 17 * 23 + 4?")
    result.answer                         # "395"
    for step in result.steps: print(format_step(step))

ReAct (Yao et al. 2022, "ReAct: Synergizing Reasoning and Acting in Language Models") interleaves a free-text
*thought* with each *action*, and feeds the action's *observation* back before the next thought. Each step here is
one reply of the model, a JSON object that holds both, in the tools API's generic format (``scratchlm.tools``)
with a thought first:

    {"thought": "I need the product first.", "tool_call": {"name": "calculator", "arguments": {"expression": "17*23"}}}
    {"thought": "391 + 4 is the total.", "response": "395"}

The whole reply is constrained by the grammar of that schema (the tools' own parameter schemas inside), so every
call names an offered tool with valid arguments, even from a 135M model; choosing the *right* call is still the
model's job. The call runs (``tools.run_tool_calls``: an exception becomes the observation, so the model can
correct itself) and its result goes back as a ``tool`` message. ``max_steps`` bounds the replies; the last one
must answer (``force_answer``), as LangChain's ``early_stopping_method="generate"``, and so must the reply after a
call that repeats an earlier one word for word.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from scratchlm.errors import ConfigError, ContextLengthError

# No maxLength: a bounded string makes every character position its own grammar state with its own token mask
# (measured on SmolLM2's vocabulary, loaded machine: 17 s of masks for a 44-token reply with maxLength 300, 0.3 s
# without). max_new_tokens bounds a thought instead.
THOUGHT = {"type": "string"}
SYSTEM = """You solve the user's task step by step. You can use these tools:
{listing}

Every reply is one JSON object that starts with your thought. To use a tool:
{{"thought": "<what you know and what to do next>", "tool_call": {{"name": "<tool>", "arguments": {{...}}}}}}
When you know the answer:
{{"thought": "<how you know it>", "response": "<the answer>"}}
A tool's result comes back as {{"tool_response": ...}}. Use the results; never guess them."""
FINAL_STEP_NOTE = "This is your last step: reply with the response now."


@dataclass
class Step:
    """One reply of the model: its thought, and either a tool call with its observation, or the answer."""

    index: int  # from 1
    thought: str
    tool: str | None = None
    arguments: dict | None = None
    observation: str | None = None
    answer: str | None = None
    reply: str = ""  # the JSON text the model wrote
    tokens: int = 0


@dataclass
class AgentResult:
    """How a run ended: the answer (None when none came), every step, and why it stopped: "answer", "max_steps"
    (``force_answer=False`` and no answer in time), "length" (a reply hit ``max_new_tokens`` before its JSON ended)
    or "context" (the conversation outgrew the model's context window)."""

    answer: str | None
    steps: list[Step] = field(default_factory=list)
    stop_reason: str = "answer"
    messages: list[dict] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.stop_reason == "answer"


def step_schema(tools: list, must_answer: bool = False) -> dict:
    """The JSON schema of one reply: ``{"thought", "tool_call": {"name", "arguments"}}`` over ``tools``, or
    ``{"thought", "response"}``; only the latter when ``must_answer``."""
    from scratchlm.tools import ToolPlan, output_schema

    plan = ToolPlan((), "none", False) if must_answer or not tools else ToolPlan(tuple(tools), "auto", False)
    schema = output_schema(plan)
    for branch in schema.get("anyOf", [schema]):
        branch["properties"] = {"thought": THOUGHT, **branch["properties"]}
        branch["required"] = ["thought", *branch["required"]]
    return schema


class Agent:
    """A ReAct agent over ``llm`` with ``tools`` (Python functions, ``scratchlm.tools.Tool`` objects with a
    function). ``sampling`` as ``LLM.chat`` for every reply (default greedy, 256 new tokens)."""

    def __init__(self, llm, tools: list, max_steps: int = 6, system: str | None = None, force_answer: bool = True,
                 max_observation_chars: int = 2000, **sampling):
        from scratchlm.tools import as_tools, check_tools

        self.llm = llm
        self.tools = as_tools(tools)
        for tool in self.tools:
            if tool.function is None:
                raise ConfigError(f"tool {tool.name!r} has no Python function: the agent must be able to run it")
        check_tools(self.tools)
        if not isinstance(max_steps, int) or max_steps < 1:
            raise ConfigError(f"max_steps must be an integer >= 1, got {max_steps!r}")
        self.max_steps = max_steps
        self.force_answer = force_answer
        self.max_observation_chars = max_observation_chars
        self.system = system if system is not None else self.default_system()
        self.sampling = {"temperature": 0.0, "max_new_tokens": 256, **sampling}
        llm.sampling(**self.sampling)  # bad sampling values fail here, not at the first step

    def default_system(self) -> str:
        listing = "\n".join(json.dumps(t.to_openai()["function"], ensure_ascii=False) for t in self.tools)
        return SYSTEM.format(listing=listing or "(none: answer directly)")

    def run(self, task: str, on_step: Callable[[Step], None] | None = None) -> AgentResult:
        """Work on ``task`` until the model answers or the steps run out; ``on_step`` sees each step as it ends."""
        result = AgentResult(None)
        for step in self._loop(task, result):
            result.steps.append(step)
            if on_step is not None:
                on_step(step)
        return result

    def _loop(self, task: str, result: AgentResult) -> Iterator[Step]:
        from scratchlm.structured import json_schema_constraint
        from scratchlm.tools import run_tool_calls, tool_call

        if not isinstance(task, str) or not task.strip():
            raise ConfigError("give the agent a task: a non-empty string")
        messages = [{"role": "system", "content": self.system}, {"role": "user", "content": task}]
        result.messages = messages
        calls_made: set[str] = set()
        repeated = False
        for index in range(1, self.max_steps + 1):
            # The last step answers; so does the step after a call repeated word for word (it can only bring back
            # what the model has already seen: greedy small models otherwise loop on it until max_steps).
            last = (index == self.max_steps and self.force_answer) or repeated
            constraint = json_schema_constraint(step_schema(self.tools, must_answer=last))
            prompt = messages + ([{"role": "user", "content": FINAL_STEP_NOTE}] if last and index > 1 else [])
            try:
                ids = self.llm.encode_chat(prompt)
                done = self.llm.complete(ids, constraint=constraint, **self.sampling)
            except ContextLengthError:
                result.stop_reason = "context"
                return
            if done.finish_reason == "length":
                result.stop_reason = "length"
                yield Step(index, "", reply=done.text, tokens=len(done.token_ids))
                return
            reply = json.loads(done.text)  # whole and valid: the constraint finished it
            step = Step(index, reply["thought"], reply=done.text, tokens=len(done.token_ids))
            messages.append({"role": "assistant", "content": done.text})
            if "response" in reply:
                step.answer = reply["response"]
                result.answer, result.stop_reason = step.answer, "answer"
                yield step
                return
            call = reply["tool_call"]
            step.tool, step.arguments = call["name"], call["arguments"]
            key = json.dumps(call, sort_keys=True)
            repeated, _ = key in calls_made, calls_made.add(key)
            request = tool_call(call["name"], json.dumps(call["arguments"], ensure_ascii=False))
            answer = run_tool_calls({"tool_calls": [request]}, self.tools)[0]
            observation = answer["content"]
            if len(observation) > self.max_observation_chars:
                observation = observation[:self.max_observation_chars] + " [... cut]"
            step.observation = answer["content"] = observation
            messages.append(answer)
            yield step
        result.stop_reason = "max_steps"


def format_step(step: Step) -> str:
    """A step as the trace prints it: thought, then the call and its observation, or the answer."""
    lines = [f"[{step.index}] thought: {step.thought}"]
    if step.tool is not None:
        lines.append(f"    call: {step.tool}({json.dumps(step.arguments, ensure_ascii=False)})")
        observation = step.observation or ""
        lines.append("    observation: " + observation.replace("\n", "\n                 "))
    elif step.answer is not None:
        lines.append(f"    answer: {step.answer}")
    else:
        lines.append(f"    (reply cut at the token budget: {step.reply[:200]!r})")
    return "\n".join(lines)
