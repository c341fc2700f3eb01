"""/v1/embeddings served by an encoder beside the chat model: the openai client, LangChain, a retrieval chain."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch

from conftest import tiny_llm
from scratchlm.encoder import Encoder
from scratchlm.formats.checkpoint import save_model_dir
from scratchlm.serve.app import create_app
from scratchlm.serve.background import BackgroundServer, free_port
from scratchlm.serve.embeddings import EmbeddingService
from test_encoder import write_tiny_bert

TEXTS = ["The cat sat on the mat.", "A cat is sitting on a rug.", "Stock markets fell sharply today.",
         "Café déjà vu — 東京 🤖", "To be, or not to be: that is the question. " * 40]  # the last is cut to 256
DOCS = ["The Zorblax festival is held every summer in the mountain town of Quillby.",
        "Photosynthesis lets green plants turn sunlight, water and carbon dioxide into sugar."]


def serve(app):
    """A started server whose chat model and encoder are both loaded."""
    server = BackgroundServer(app)
    url = server.__enter__()
    deadline = time.monotonic() + 60
    while app.state.embeddings.encoder is None:
        assert app.state.embeddings.load_error is None and time.monotonic() < deadline
        time.sleep(0.02)
    return server, url


@pytest.fixture(scope="module")
def minilm(minilm_path) -> Encoder:
    return Encoder.load("all-minilm-l6-v2")


@pytest.fixture(scope="module")
def server(minilm):
    app = create_app(tiny_llm(), model_name="tiny", embeddings=EmbeddingService(lambda: minilm))
    background, url = serve(app)
    yield url
    background.__exit__(None, None, None)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def test_embeddings_equal_the_library_with_exact_usage(client, minilm):
    with pytest.warns(UserWarning, match="truncated"):
        expected = minilm.embed(TEXTS)
    r = client.embeddings.create(model="all-minilm-l6-v2", input=TEXTS)
    got = torch.tensor([d.embedding for d in r.data])
    assert [d.index for d in r.data] == list(range(len(TEXTS))) and r.model == "all-minilm-l6-v2"
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    tokens = sum(min(len(minilm.tokenizer.encode(t)), 256) for t in TEXTS)
    assert r.usage.prompt_tokens == r.usage.total_tokens == tokens
    # base64 (what the openai client asks for by default) carries the same float32 values
    b64 = client.embeddings.create(model="all-minilm-l6-v2", input=TEXTS[:2], encoding_format="base64")
    assert isinstance(b64.data[0].embedding, str)
    r2 = httpx.post(f"{client.base_url}embeddings", json={"model": "all-minilm-l6-v2", "input": TEXTS[0]}).json()
    torch.testing.assert_close(torch.tensor(r2["data"][0]["embedding"]), expected[0], atol=1e-6, rtol=0)


def test_token_id_inputs_equal_text_inputs(client, minilm):
    ids = minilm.tokenizer.encode(TEXTS[2], add_special_tokens=False)
    r = client.embeddings.create(model="all-minilm-l6-v2", input=[ids, minilm.tokenizer.encode(TEXTS[2])],
                                 encoding_format="float", dimensions=384)
    expected = minilm.embed([TEXTS[2]])[0]
    for d in r.data:
        torch.testing.assert_close(torch.tensor(d.embedding), expected, atol=1e-6, rtol=0)
    assert r.usage.prompt_tokens == 2 * (len(ids) + 2)


@pytest.mark.parametrize("body,status,message", [
    ({"model": "all-minilm-l6-v2", "input": []}, 400, "must not be empty"),
    ({"model": "all-minilm-l6-v2", "input": [[1, 99999]]}, 400, "outside this model's vocabulary"),
    ({"model": "all-minilm-l6-v2", "input": "x", "dimensions": 100}, 400, "dimensions must be 384"),
    ({"model": "all-minilm-l6-v2", "input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"model": "gpt-4", "input": "x"}, 404, "does not exist"),
])
def test_bad_requests_get_openai_errors(server, body, status, message):
    r = httpx.post(server + "/v1/embeddings", json=body)
    assert r.status_code == status
    error = r.json()["error"]
    assert message in error["message"] and set(error) == {"message", "type", "param", "code"}


def test_models_lists_chat_and_embedding_models(client):
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"tiny", "all-minilm-l6-v2"}
    assert client.models.retrieve("all-minilm-l6-v2").embedding_dimensions == 384


def test_concurrent_requests_are_batched_and_equal_each_alone(server, minilm):
    texts = [f"sentence number {i} about {'cats' if i % 2 else 'markets'}" for i in range(24)]

    async def go():
        async with openai.AsyncOpenAI(base_url=server + "/v1", api_key="unused", max_retries=0) as c:
            return await asyncio.gather(*(c.embeddings.create(model="all-minilm-l6-v2", input=texts[i:i + 3])
                                          for i in range(0, len(texts), 3)))

    answers = asyncio.run(go())
    got = torch.tensor([d.embedding for r in answers for d in r.data])
    torch.testing.assert_close(got, minilm.embed(texts), atol=1e-5, rtol=0)


def test_langchain_openai_embeddings_offline(server, minilm):
    from langchain_openai import OpenAIEmbeddings

    # check_embedding_ctx_length=False: LangChain otherwise tokenises with tiktoken (a download) and sends ids
    emb = OpenAIEmbeddings(model="all-minilm-l6-v2", base_url=server + "/v1", api_key="unused",
                           check_embedding_ctx_length=False)
    docs = emb.embed_documents(TEXTS[:3])
    torch.testing.assert_close(torch.tensor(docs), minilm.embed(TEXTS[:3]), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.tensor(emb.embed_query(TEXTS[0])), minilm.embed(TEXTS[0])[0], atol=1e-6, rtol=0)


def test_tiny_encoder_served_with_tiny_chat_model(tmp_path):
    encoder = Encoder.load(write_tiny_bert(tmp_path / "bert"))
    app = create_app(tiny_llm(), model_name="tiny", embeddings=EmbeddingService(lambda: encoder))
    background, url = serve(app)
    try:
        r = httpx.post(url + "/v1/embeddings", json={"model": "bert", "input": ["the cat", "a dog"]}).json()
        torch.testing.assert_close(torch.tensor([d["embedding"] for d in r["data"]]),
                                   encoder.embed(["the cat", "a dog"]), atol=1e-6, rtol=0)
        # the chat model still answers chat, and its name is not the encoder's
        chat = httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "max_tokens": 3,
                                                              "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] >= 1
        assert httpx.post(url + "/v1/embeddings", json={"model": "tiny", "input": "x"}).status_code == 404
    finally:
        background.__exit__(None, None, None)


def test_langchain_retrieval_chain_answers_from_the_right_document(smollm2, minilm):
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_core.runnables import RunnablePassthrough
    from langchain_core.vectorstores import InMemoryVectorStore
    from langchain_openai import ChatOpenAI, OpenAIEmbeddings

    app = create_app(smollm2, model_name="smollm2", embeddings=EmbeddingService(lambda: minilm))
    background, url = serve(app)
    try:
        embeddings = OpenAIEmbeddings(model="all-minilm-l6-v2", base_url=url + "/v1", api_key="unused",
                                      check_embedding_ctx_length=False)
        store = InMemoryVectorStore.from_texts(DOCS, embedding=embeddings)
        retriever = store.as_retriever(search_kwargs={"k": 1})
        question = "Where is the Zorblax festival held?"
        assert [d.page_content for d in retriever.invoke(question)] == [DOCS[0]]
        prompt = ChatPromptTemplate.from_messages([
            ("system", "Answer the question using only this context:\n{context}"), ("human", "{question}")])
        llm = ChatOpenAI(model="smollm2", base_url=url + "/v1", api_key="unused", temperature=0, max_tokens=40)
        chain = ({"context": retriever | (lambda docs: "\n".join(d.page_content for d in docs)),
                  "question": RunnablePassthrough()} | prompt | llm | StrOutputParser())
        answer = chain.invoke(question)
        assert "Quillby" in answer
        metrics = httpx.get(url + "/metrics").text
        for route in ("/v1/embeddings", "/v1/chat/completions"):
            assert re.search(rf'scratchlm_requests_total{{route="{route}",status="200"}} [1-9]', metrics), route
    finally:
        background.__exit__(None, None, None)


def test_serve_command_with_an_embedding_model(tmp_path):
    llm = tiny_llm()
    model_dir = save_model_dir(tmp_path / "tiny", llm.config, llm.model.canonical_state_dict(), llm.tokenizer)
    bert = write_tiny_bert(tmp_path / "bert")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "scratchlm.cli", "--threads", "1", "serve", str(model_dir),
                             "--port", str(port), "--embedding-model", str(bert)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:  # /health answers 200 once both models are loaded
            assert proc.poll() is None, proc.stderr.read()
            try:
                health = httpx.get(url + "/health")
                if health.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert health.json()["embedding_model"] == "bert"
        r = httpx.post(url + "/v1/embeddings", json={"model": "bert", "input": ["the cat sat", "dog"]})
        expected = Encoder.load(bert).embed(["the cat sat", "dog"])
        torch.testing.assert_close(torch.tensor([d["embedding"] for d in r.json()["data"]]), expected,
                                   atol=1e-6, rtol=0)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    assert proc.returncode == 0
    # an embedding model that does not exist stops the command before the server starts, in one line
    r = subprocess.run([sys.executable, "-m", "scratchlm.cli", "serve", str(model_dir), "--embedding-model",
                        "no-such-encoder"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: unknown model 'no-such-encoder'")
    # one that fails to load (a language model is no encoder) stops the server with that reason
    r = subprocess.run([sys.executable, "-m", "scratchlm.cli", "serve", str(model_dir), "--port", str(free_port()),
                        "--embedding-model", str(model_dir)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: ") and "config.json" in r.stderr
