"""Agents: a ReAct loop over the tools API, and built-in tools that are safe by construction.

    from scratchlm.agent import Agent, calculator, FileReader

    agent = Agent(llm, tools=[calculator, FileReader("notes/").tool()], max_steps=6)
    result = agent.run("What is 17 * 23 + 4?")
    result.answer, result.steps

Modules, one concept each: ``react`` (the loop, its step schema and trace), ``calculator`` (arithmetic through
``ast``, no ``eval``), ``file_reader`` (reads inside one folder only), ``search`` (a RAG store's passages),
``user_tools`` (tools from a Python module), ``cli`` (``scratchlm agent``). Docs: docs/agents.md.
"""

from scratchlm.agent.calculator import calculate, calculator
from scratchlm.agent.file_reader import FileReader
from scratchlm.agent.react import Agent, AgentResult, Step, format_step, step_schema
from scratchlm.agent.search import DocumentSearch
from scratchlm.agent.user_tools import tools_from_module

__all__ = ["Agent", "AgentResult", "DocumentSearch", "FileReader", "Step", "calculate", "calculator",
           "format_step", "step_schema", "tools_from_module"]
