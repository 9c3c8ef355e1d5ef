"""Fixtures for the inference tests: a tiny model with a small tokenizer, the whole service running as real
processes (Redis, ``uvicorn api.main:app``, ``uvicorn worker.inference.app:app``, a Celery worker), and a CITI
adapter trained by a real job through that service until it calls the weather tool.

Why a small tokenizer: with SmolLM2's 49k-token vocabulary the output layer is most of a tiny model's
work, and a job that overfits two tool conversations takes minutes on the 2-core machine; with a
512-token BPE vocabulary trained on the test's own texts it takes seconds. Why one torch thread: on a
shared 2-core machine, torch's two spinning threads per process make every step about ten times slower.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import (
    KEYS,
    base_env,
    claim_redis_db,
    release_redis_db,
    start_api,
    start_uvicorn,
    start_worker,
    stop_process,
    to_jsonl,
)

ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
STOCK_TOOL = {"type": "function", "function": {
    "name": "get_stock_price", "description": "Latest price of a stock",
    "parameters": {"type": "object", "properties": {"ticker": {"type": "string"}}, "required": ["ticker"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}
RESULT = {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"temp_c": 22, "sky": "sunny"})}
ANSWER = "It is sunny and 22 C in Paris."
GENERAL = [("Say hello.", "Hello!"), ("Say goodbye.", "Goodbye!"), ("Name a colour.", "Blue."),
           ("Count to three.", "One, two, three."), ("What is two plus two?", "Four.")]


def weather_training_lines() -> list[dict]:
    """Two tool conversations, repeated: ask -> call get_weather(Paris); ask, call, result -> the answer."""
    call = {"messages": ASK + [{"role": "assistant", "content": None, "tool_calls": [CALL]}], "tools": [WEATHER_TOOL]}
    answer = {"messages": ASK + [{"role": "assistant", "content": None, "tool_calls": [CALL], "weight": 0}, RESULT,
                                 {"role": "assistant", "content": ANSWER}], "tools": [WEATHER_TOOL]}
    return [call, answer] * 6


def general_lines() -> list[dict]:
    """Plain answers (task type 0), so the routing loss sees both kinds and no replay is generated."""
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in GENERAL] * 2


def make_small_model_dir(path: Path) -> str:
    """A tiny random Llama whose BPE tokenizer (512 tokens, ChatML template) is trained on the tests' texts.

    The pre-tokenizer does not split on punctuation, so frequent strings such as ``<tool_call>{"name": "``
    become single tokens. Any other text still encodes, byte by byte.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from citi_engine.data.chat_format import CHATML_TEMPLATE, format_tool_calls, tools_system_block

    corpus = [tools_system_block([WEATHER_TOOL]), tools_system_block([STOCK_TOOL]), format_tool_calls([CALL]),
              ASK[0]["content"], ANSWER, RESULT["content"], "You are a helpful assistant.",
              "<|im_start|>system\n", "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_start|>tool\n",
              *[q + " " + a for q, a in GENERAL]] * 4
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")
    tok.chat_template = CHATML_TEMPLATE
    path.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(path)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


@pytest.fixture(scope="session")
def model_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def small_model(model_root) -> str:
    """The tiny model's directory (under the service's CITI_MODEL_DIRS)."""
    return make_small_model_dir(model_root / "tiny-chat")


# -- adapters written by the engine ------------------------------------------------------------------


@pytest.fixture(scope="session")
def varied_model(small_model, tmp_path_factory) -> str:
    """The tiny model with larger random weights, so greedy text varies with the prompt (std 0.02 repeats one token)."""
    from citi_engine import testing
    from citi_engine.models import load_model

    model, tok = load_model(small_model, device="cpu")
    testing.vary_weights(model)
    out = tmp_path_factory.mktemp("varied") / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def make_adapter(base_dir: str, out_dir, method: str, seed: int = 1) -> str:
    """An adapter written by the engine, its trained tensors moved away from their (identity) start."""
    import torch

    from citi_engine.adapter import apply_method, save_adapter
    from citi_engine.components import list_components
    from citi_engine.models import load_model

    model, _ = load_model(base_dir, device="cpu")
    comps = list_components(model)
    if method == "citi":
        peft_model = apply_method(model, "citi", molora=comps[1:4], uco=[comps[5], comps[12]], num_experts=4, rank=4,
                                  alpha=8.0)
    else:
        peft_model = apply_method(model, "lora", lora_rank=4, lora_alpha=8)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if any(k in name for k in ("molora_B", "lora_B", "modules_to_save", "molora_router")):
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    save_adapter(peft_model, out_dir, {"model": base_dir})
    return str(out_dir)


@pytest.fixture(scope="session")
def citi_dir(varied_model, tmp_path_factory) -> str:
    return make_adapter(varied_model, tmp_path_factory.mktemp("citi") / "adapter", "citi")


@pytest.fixture(scope="session")
def lora_dir(varied_model, tmp_path_factory) -> str:
    return make_adapter(varied_model, tmp_path_factory.mktemp("lora") / "adapter", "lora")


# -- the service -----------------------------------------------------------------------------------


# The secret the API presents to the inference server (both read CITI_INFERENCE_TOKEN).
INFERENCE_TOKEN = "test-inference-token-0123456789"


@dataclass
class Stack:
    """The running processes and how to reach them."""

    api_url: str
    inference_url: str
    env: dict
    logs: list[Path]

    def client(self, who: str = "alice", **kwargs) -> httpx.Client:
        headers = {"Authorization": f"Bearer {KEYS[who]}"} if who else {}
        return httpx.Client(base_url=self.api_url, headers=headers, timeout=120, **kwargs)

    def openai(self, who: str = "alice"):
        from openai import OpenAI

        return OpenAI(base_url=self.api_url + "/v1", api_key=KEYS[who], max_retries=0, timeout=120)

    def tail_logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in self.logs if p.is_file())


def start_inference(env: dict, log: Path) -> tuple[subprocess.Popen, str]:
    """``uvicorn worker.inference.app:app`` on a free port, once /healthz answers."""
    return start_uvicorn("worker.inference.app:app", env, log, name="the inference server", timeout=90)


@pytest.fixture(scope="session")
def stack(tmp_path_factory, model_root, small_model):
    """Redis (one claimed database), the inference server, then the API pointing at it."""
    db = claim_redis_db()
    base = tmp_path_factory.mktemp("stack")
    env = base_env(db, base / "artifacts", model_root)
    env.update({"OMP_NUM_THREADS": "1", "CITI_INFERENCE_DEVICE": "cpu", "CITI_ADAPTER_CACHE_SIZE": "2",
                "CITI_INFERENCE_MAX_NEW_TOKENS": "48", "CITI_INFERENCE_CACHE_DIR": str(base / "inference-cache"),
                "CITI_INFERENCE_TOKEN": INFERENCE_TOKEN})
    logs = [base / "inference.log", base / "api.log"]
    inference, inference_url = start_inference(env, logs[0])
    env["CITI_INFERENCE_URL"] = inference_url
    try:
        api, api_url = start_api(env, logs[1])
    except Exception:
        stop_process(inference)
        raise
    yield Stack(api_url=api_url, inference_url=inference_url, env=env, logs=logs)
    stop_process(api)
    stop_process(inference)
    release_redis_db(db)


# Enough stage-2 steps at a high learning rate for the tiny model to learn both conversations by heart;
# no evaluation, no held-out split (the point is a real job's adapter that reliably calls the tool).
# 60 epochs were not enough: with another CPU thread count (float order) or seed the answer came out as
# "22 22 22 C" in 2 of 5 runs; 100 epochs gave the exact answer in all 8 runs tried (seeds 0-3, 1 and 2 threads).
TRAINING = {
    "method": {"type": "citi", "hyperparameters": {
        "batch_size": 4, "lr_router_pretraining": 0.01, "lr_molora": 0.01, "lr_uco": 0.001, "epochs_molora": 100.0,
        "epochs_router_pretraining": 1.0, "epochs_uco": 1.0, "warmup_ratio": 0.0, "routing_beta": 0.0,
        "importance_examples": 4, "eval_examples": 0, "eval_probes": 0, "eval_humaneval": 0, "max_length": 512}},
    "components": {"molora_fraction": 0.5, "uco_fraction": 0.3, "alpha": 16.0},
    "test_fraction": 0.0,
    "checkpoint_every": 0,
    "seed": 0,
    "suffix": "weather",
}


def upload(client: httpx.Client, name: str, lines: list[dict]) -> str:
    r = client.post("/v1/files", files={"file": (name, to_jsonl(lines))}, data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    return r.json()["id"]


@pytest.fixture(scope="session")
def weather_model(stack, small_model, tmp_path_factory) -> str:
    """alice's fine-tuned model: a CITI job run by a real Celery worker, to success. Returns its model id."""
    logs = tmp_path_factory.mktemp("worker")
    worker = start_worker(stack.env, "inference-trainer", logs / "worker.log")
    stack.logs.append(logs / "worker.log")
    try:
        with stack.client("alice") as c:
            body = {"model": small_model, "training_file": upload(c, "weather.jsonl", weather_training_lines()),
                    "general_file": upload(c, "general.jsonl", general_lines()), **TRAINING}
            r = c.post("/v1/fine_tuning/jobs", json=body)
            assert r.status_code == 200, r.text
            job_id = r.json()["id"]
            deadline = time.time() + 400
            while True:
                job = c.get(f"/jobs/{job_id}").json()
                if job["status"] in ("succeeded", "failed", "cancelled"):
                    break
                assert time.time() < deadline, f"the job is still {job['status']}\n{stack.tail_logs()}"
                time.sleep(1)
        assert job["status"] == "succeeded", f"{json.dumps(job)[:2000]}\n{stack.tail_logs()}"
        return job["fine_tuned_model"]
    finally:
        worker.stop()
