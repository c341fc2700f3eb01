"""Constrained generation end to end: every output that did not stop for length parses and validates with
``jsonschema`` (Draft 2020-12), greedy and sampled with several seeds, on a tiny random model (random schemas) and
on SmolLM2 (realistic ones); the Python keywords and the CLI flags."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from conftest import tiny_llm
from scratchlm.cli import main
from scratchlm.formats.checkpoint import save_model_dir
from scratchlm.structured import json_schema_constraint
from structured_helpers import FIXED, random_schemas

pytestmark = pytest.mark.usefixtures("one_thread")


def _check_outputs(schema, completions) -> int:
    """Assert every completed output is valid; returns how many completed (finish_reason "stop")."""
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    done = 0
    for c in completions:
        if c.finish_reason == "length":
            continue
        value = json.loads(c.text)
        errors = [e.message for e in validator.iter_errors(value)]
        assert errors == [], (schema, c.text)
        done += 1
    return done


def test_tiny_model_outputs_validate_on_random_schemas():
    llm = tiny_llm()
    schemas = random_schemas(12, seed=1)
    done = total = 0
    for i, schema in enumerate(schemas):
        prompts = ["{", "Answer in JSON:", "x"]
        results = llm.complete(prompts, json_schema=schema, temperature=1.0, seed=i, max_new_tokens=200,
                               top_k=None, min_p=None, repetition_penalty=1.0)
        results += [llm.complete("JSON:", json_schema=schema, temperature=0, max_new_tokens=200)]
        done += _check_outputs(schema, results)
        total += len(results)
    assert done >= total // 2, f"only {done} of {total} outputs completed: the validity check says little"


def test_tiny_model_fixed_schemas_and_sampling_filters():
    llm = tiny_llm(seed=3)
    for name in ("code", "list", "weather_call"):
        schema = FIXED[name]
        results = [llm.complete("{", json_schema=schema, temperature=t, seed=s, max_new_tokens=300, **extra)
                   for t, s, extra in [(0, None, {}), (1.0, 1, {}), (1.0, 2, dict(top_p=0.5)),
                                       (0.7, 3, dict(repetition_penalty=1.3))]]
        _check_outputs(schema, results)


def test_regex_and_grammar_keywords_and_stop_at_end():
    llm = tiny_llm()
    for seed in range(4):
        out = llm.complete("id:", regex=r"[A-Z]{2}-[0-9]{3}", temperature=1.0, seed=seed, max_new_tokens=20)
        assert re.fullmatch(r"[A-Z]{2}-[0-9]{3}", out.text) and out.finish_reason == "stop"
        # nothing can follow the last digit: the sequence ends there without asking the model for EOS
        assert len(out.token_ids) == 6
    text = llm.generate("a", grammar='root ::= ("yes" | "no") ("," ("yes" | "no"))*', temperature=1.0, seed=0,
                        max_new_tokens=30)
    assert re.fullmatch(r"(yes|no)(,(yes|no))*", text) or len(text) >= 20


def test_chat_response_format_json_schema_and_batch(tiny):
    schema = FIXED["code"]
    replies = tiny.chat([[{"role": "user", "content": "a product"}], "another"], temperature=1.0, seed=5,
                        max_new_tokens=60, response_format={"type": "json_schema",
                                                            "json_schema": {"name": "p", "schema": schema}})
    for reply in replies:
        jsonschema.validate(json.loads(reply), schema)


def test_constraint_is_cached_by_schema():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert json_schema_constraint(schema) is json_schema_constraint(json.loads(json.dumps(schema)))


def test_cli_generate_json_schema(tmp_path, capsys):
    schema_file = tmp_path / "s.json"
    schema_file.write_text(json.dumps(FIXED["code"]))
    llm = tiny_llm()
    model = save_model_dir(tmp_path / "tiny", llm.config, llm.model.canonical_state_dict(), llm.tokenizer)
    assert main(["generate", str(model), "{", "--json-schema", str(schema_file), "--temperature", "1",
                 "--seed", "1", "--max-new-tokens", "80"]) == 0
    out = capsys.readouterr().out.strip()
    jsonschema.validate(json.loads(out), FIXED["code"])
    assert main(["generate", str(model), "id", "--regex", "[a-c]{4}", "--temperature", "1", "--seed", "2"]) == 0
    assert re.fullmatch("[a-c]{4}", capsys.readouterr().out.strip())
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "string", "uniqueItems": true}')
    assert main(["generate", str(model), "x", "--json-schema", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "unsupported JSON schema keyword at #: uniqueItems" in err and err.count("\n") == 1
    assert main(["generate", str(model), "x", "--grammar", str(tmp_path / "missing.gbnf")]) == 2
    assert "cannot read --grammar file" in capsys.readouterr().err


# ---- SmolLM2 -------------------------------------------------------------------------------------------------
PROMPTS = {
    "person": "Describe a fictional person as JSON with name, age, email and tags.",
    "weather_call": "Call the weather tool for Paris in celsius. Reply with JSON.",
    "tree": "Give a small tree of labels as JSON.",
    "mixed": "Make up a record with an id, a date, a score, a flag, a choice and a pair, as JSON.",
    "code": "Give a product code and quantity as JSON.",
    "list": "List two key/value items as JSON.",
}


def test_smollm2_outputs_validate(smollm2):
    done = total = 0
    for name, schema in FIXED.items():
        messages = [{"role": "user", "content": PROMPTS[name]}]
        results = [smollm2.complete(messages, json_schema=schema, temperature=0, max_new_tokens=60)]
        results += smollm2.complete([messages] * 2, json_schema=schema, temperature=1.0, seed=7, max_new_tokens=60)
        done += _check_outputs(schema, results)
        total += len(results)
    assert done >= total // 2, f"only {done} of {total} completed"
