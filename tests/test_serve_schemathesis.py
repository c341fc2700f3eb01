"""Property-based fuzzing of every route in /openapi.json with schemathesis: valid bodies (positive mode)
and invalid ones (negative mode) alike must never produce a server error (5xx) or a hang, and every error
must come in OpenAI's shape.

The operations are driven through schemathesis' hypothesis strategies directly (its pytest plugin does not
support this pytest version)."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

from conftest import tiny_llm
from scratchlm.serve.app import create_app
from scratchlm.serve.background import BackgroundServer

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
EXAMPLES = 25  # per operation and mode


@pytest.fixture(scope="module")
def api_schema():
    # A small context keeps each generated request cheap; the queue is large so that the fuzzer never sees
    # a (legitimate) 429.
    app = create_app(tiny_llm(context_length=64), api_key=KEY, max_batch=4, max_queue=256, max_len=64)
    with BackgroundServer(app) as url:
        yield schemathesis.openapi.from_url(url + "/openapi.json", headers=AUTH)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_no_input_makes_a_server_error(api_schema, mode):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/embeddings"}
    statuses = []
    for operation in operations:
        if mode == GenerationMode.NEGATIVE and operation.method.upper() != "POST":
            continue  # nothing to make invalid in a GET without parameters

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                  phases=[Phase.explicit, Phase.generate])  # report a failure as found: shrinking takes minutes
        def check(case):
            if isinstance(case.body, dict) and "model" in case.body and len(statuses) % 4:
                case.body["model"] = "tiny-llama"  # mostly the served model, so requests get past that check
            response = case.call(headers=AUTH, timeout=120)  # a hang fails the test
            statuses.append(response.status_code)
            assert response.status_code < 500, (case.operation.path, response.status_code, response.text[:500])
            if response.status_code >= 400:
                error = response.json()["error"]
                assert isinstance(error["message"], str) and error["message"]

        check()
    assert statuses  # the fuzzer really sent requests
    if mode == GenerationMode.POSITIVE:
        assert 200 in statuses  # and some of them got all the way through the engine
