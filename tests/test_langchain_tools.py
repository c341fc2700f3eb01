"""LangChain against our server: ``with_structured_output(..., method="json_schema")``, ``bind_tools`` with
``tool_choice``, and an agent from ``langchain.agents.create_agent`` that runs tools until it answers, on SmolLM2
and on a tiny random model (whose calls are nonsense but must still be valid: the grammar allows nothing else)."""

from __future__ import annotations

from typing import Literal

import jsonschema
import pytest
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from conftest import tiny_llm
from scratchlm.serve.app import create_app
from scratchlm.serve.background import BackgroundServer


class City(BaseModel):
    """A city and what it is known for."""

    name: str = Field(description="the city's name")
    country: str = Field(description="the country it is in", max_length=40)
    known_for: list[str] = Field(description="up to three things it is known for", max_length=3)


@tool
def get_weather(city: str) -> str:
    """Get the current temperature in a city, in degrees Celsius.

    Args:
        city: the city's name
    """
    return f'{{"city": "{city[:20]}", "celsius": 18}}'


@tool
def celsius_to_fahrenheit(celsius: float) -> float:
    """Convert a temperature from Celsius to Fahrenheit.

    Args:
        celsius: the temperature in degrees Celsius
    """
    return celsius * 9 / 5 + 32


class Label(BaseModel):
    """Short fields, so that a random model finishes them well within its token budget."""

    text: str = Field(max_length=8)
    score: int = Field(ge=0, le=9)
    kind: Literal["a", "b"]


TOOLS = [get_weather, celsius_to_fahrenheit]
SCHEMAS = {t.name: t.tool_call_schema.model_json_schema() for t in TOOLS}


@pytest.fixture(scope="module")
def smollm2_url(smollm2):
    with BackgroundServer(create_app(smollm2, max_batch=4, model_name="smollm2")) as url:
        yield url


@pytest.fixture(scope="module")
def tiny_url():
    app = create_app(tiny_llm("llama", seed=2, context_length=4096), max_len=4096, model_name="tiny")
    with BackgroundServer(app) as url:
        yield url


def chat_model(url: str, model: str, **kwargs) -> ChatOpenAI:
    return ChatOpenAI(base_url=url + "/v1", api_key="unused", model=model, max_retries=0, **kwargs)


def check_tool_calls(message: AIMessage, allowed: set[str]) -> None:
    assert message.tool_calls and not message.invalid_tool_calls
    for call in message.tool_calls:
        assert call["name"] in allowed and call["id"].startswith("call_")
        jsonschema.Draft202012Validator(SCHEMAS[call["name"]]).validate(call["args"])


def test_smollm2_structured_output_is_an_instance(smollm2_url):
    llm = chat_model(smollm2_url, "smollm2", temperature=0, max_tokens=120)
    city = llm.with_structured_output(City, method="json_schema").invoke("Describe Paris as a city.")
    assert isinstance(city, City) and city.name


def test_smollm2_bind_tools_with_tool_choice(smollm2_url):
    llm = chat_model(smollm2_url, "smollm2", temperature=0, max_tokens=60)
    # parallel_tool_calls=False: allowed several calls, a greedy 135M model repeats its call until max_tokens.
    message = llm.bind_tools(TOOLS, tool_choice="get_weather", parallel_tool_calls=False).invoke(
        "What is the weather like in Rome?")
    check_tool_calls(message, {"get_weather"})
    assert message.tool_calls[0]["args"]["city"].lower() == "rome"
    message = llm.bind_tools(TOOLS, tool_choice="any", parallel_tool_calls=False).invoke(
        "Convert 30 degrees Celsius to Fahrenheit.")
    check_tool_calls(message, {t.name for t in TOOLS})
    assert len(message.tool_calls) == 1


def test_tiny_model_structured_output_and_tools_stay_valid(tiny_url):
    llm = chat_model(tiny_url, "tiny", temperature=1.0, seed=3, max_tokens=200)
    for seed in (3, 4):
        label = llm.with_structured_output(Label, method="json_schema").invoke("A label.", seed=seed)
        assert isinstance(label, Label)
    check_tool_calls(llm.bind_tools(TOOLS, tool_choice="required").invoke("Weather?"), {t.name for t in TOOLS})


def test_smollm2_agent_calls_a_tool_reads_the_result_and_answers(smollm2_url):
    """The agent loop end to end on the real model: the call goes out, the tool's result comes back as a tool
    message with the call's id, and the run ends with an answer that uses it. (SmolLM2-135M does not chain two
    different tools: given both, it calls the one the question needs, then answers; docs/tools.md.)"""
    from langchain.agents import create_agent

    agent = create_agent(chat_model(smollm2_url, "smollm2", temperature=0, max_tokens=80), tools=TOOLS)
    result = agent.invoke({"messages": [{"role": "user", "content": "What is the weather in Paris?"}]},
                          {"recursion_limit": 8})
    messages = result["messages"]
    calls = {c["id"]: c["name"] for m in messages if isinstance(m, AIMessage) for c in m.tool_calls}
    results = [m for m in messages if isinstance(m, ToolMessage)]
    assert "get_weather" in calls.values()
    assert [calls[m.tool_call_id] for m in results] == list(calls.values())  # every call answered, in order
    final = messages[-1]
    assert isinstance(final, AIMessage) and not final.tool_calls and final.content.strip()
