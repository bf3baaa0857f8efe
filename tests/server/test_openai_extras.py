"""Tool calling, reasoning output and prompt logprobs over HTTP, through the real `openai`
client, against one server.

The server runs a tiny random-weight Llama whose tokenizer is the default model's with a
Hermes/Qwen-style chat template written here (it takes `tools=` and `enable_thinking`), with
`--reasoning-parser qwen3`; the tool-call parser is chosen by the template (hermes). A random
model was never trained for tools: required and named choices must still return valid calls
(the grammar enforces them), and `auto` is checked on canned outputs that a `choice`
constraint makes the model write. Prompt logprobs (completions' echo, /generate's
return_logprob) are checked against HF transformers on the same weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.server.conftest import running_server

pytest.importorskip("fastapi")
pytest.importorskip("llguidance")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
torch = pytest.importorskip("torch")

NAME = "tiny-hermes"
TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nYou may call functions. Signatures:\n<tools>\n"
    "{%- for t in tools %}\n{{ t | tojson }}{%- endfor %}\n</tools>\nReply with "
    "<tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>.<|im_end|>\n{%- endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{%- for c in m.tool_calls or [] %}\n<tool_call>\n{\"name\": \"{{ c.function.name }}\", "
    "\"arguments\": {{ c.function.arguments | tojson }}}\n</tool_call>{%- endfor %}"
    "<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
    "{%- endif %}{%- endif %}"
)
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"]}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, default_tokenizer) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny_hermes")
    config = LlamaConfig(vocab_size=len(default_tokenizer), hidden_size=64,
                         intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=default_tokenizer.bos_token_id,
                         eos_token_id=default_tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    default_tokenizer.save_pretrained(path)
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = TEMPLATE
    cfg_path.write_text(json.dumps(cfg))
    (path / "chat_template.jinja").unlink(missing_ok=True)  # it would win over the config's
    return path


@pytest.fixture(scope="module")
def client(tiny_dir, tmp_path_factory):
    args = [str(tiny_dir), "--backend", "cpu", "--max-total-tokens", "2048",
            "--max-running-requests", "4", "--chunked-prefill-size", "256",
            "--served-model-name", NAME, "--reasoning-parser", "qwen3"]
    with running_server(tmp_path_factory.mktemp("tools"), args) as server:
        yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0,
                            timeout=120)


def chat(client, messages=ASK, max_tokens: int = 80, **kw):
    return client.chat.completions.create(model=NAME, messages=messages, temperature=0,
                                          max_tokens=max_tokens, **kw)


def streamed(client, **kw) -> tuple[dict, list, str]:
    """(fields, tool calls, finish_reason) put together from the deltas, as clients do."""
    fields: dict[str, str] = {}
    calls: dict[int, dict] = {}
    reason = None
    for chunk in chat(client, stream=True, **kw):
        for ch in chunk.choices:
            d = ch.delta
            for key in ("content", "reasoning_content"):
                piece = getattr(d, key, None) or (d.model_extra or {}).get(key)
                if piece:
                    fields[key] = fields.get(key, "") + piece
            for tc in d.tool_calls or []:
                call = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = tc.id or call["id"]
                call["name"] += tc.function.name or ""
                call["arguments"] += tc.function.arguments or ""
            reason = ch.finish_reason or reason
    return fields, [calls[i] for i in sorted(calls)], reason


def check_call(name: str, arguments: str) -> None:
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])
    assert set(json.loads(arguments)) <= set(SCHEMAS[name]["properties"])  # strict


def test_named_tool_choice_returns_a_valid_call(client) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = chat(client, tools=TOOLS, tool_choice=named)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    (call,) = c.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    check_call(call.function.name, call.function.arguments)
    fields, calls, reason = streamed(client, tools=TOOLS, tool_choice=named)
    assert reason == "tool_calls" and "content" not in fields
    assert [(x["name"], x["arguments"]) for x in calls] == [
        ("get_weather", call.function.arguments)]  # greedy: the same call


@pytest.mark.parametrize("stream", [False, True])
def test_required_tool_choice_returns_valid_calls(client, stream) -> None:
    kw = dict(tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=120)
    if stream:
        _, calls, reason = streamed(client, **kw)
        calls = [(x["name"], x["arguments"]) for x in calls]
    else:
        c = chat(client, **kw).choices[0]
        reason, calls = c.finish_reason, [(t.function.name, t.function.arguments)
                                          for t in c.message.tool_calls]
    assert reason == "tool_calls" and len(calls) == 1
    for name, arguments in calls:
        check_call(name, arguments)


CANNED = ('Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
          '"unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": '
          '{"tz": "CET"}}\n</tool_call>')


def test_auto_parses_the_model_output_streamed_and_not(client) -> None:
    # The choice constraint makes the random model write CANNED, which the hermes parser reads.
    kw = dict(tools=TOOLS, max_tokens=120, extra_body={"guided_choice": [CANNED]})
    c = chat(client, **kw).choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content == "Checking."
    got = [(t.function.name, json.loads(t.function.arguments)) for t in c.message.tool_calls]
    assert got == [("get_weather", {"city": "Paris", "unit": "celsius"}),
                   ("get_time", {"tz": "CET"})]
    assert len({t.id for t in c.message.tool_calls}) == 2
    fields, calls, reason = streamed(client, **kw)
    assert fields == {"content": "Checking."} and reason == "tool_calls"
    assert [(x["name"], json.loads(x["arguments"])) for x in calls] == got
    # tool_choice none: the same output is plain content.
    c = chat(client, tool_choice="none", **kw).choices[0]
    assert c.finish_reason == "stop" and c.message.content == CANNED
    assert not c.message.tool_calls


def test_tools_and_history_reach_the_template(client) -> None:
    plain = chat(client, max_tokens=1).usage.prompt_tokens
    with_tools = chat(client, tools=TOOLS, max_tokens=1).usage.prompt_tokens
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": 21}'}]
    followed = chat(client, messages=history, tools=TOOLS, max_tokens=1).usage.prompt_tokens
    assert plain < with_tools < followed


@pytest.mark.parametrize(("tools", "choice", "param"), [
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}],
     "auto", "tools.0.function.parameters.type"),
    ([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "(unclosed"}}}}}],
     "required", "tools"),
    (TOOLS, {"type": "function", "function": {"name": "missing"}}, "tool_choice"),
])
def test_bad_tools_are_400_and_the_server_keeps_serving(client, tools, choice, param) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, tools=tools, tool_choice=choice)
    assert e.value.body["param"] == param
    assert chat(client, max_tokens=2).choices[0].finish_reason == "length"


THOUGHT = "<think>\nThe user wants the weather.\n</think>\n\nIt is sunny."


def test_reasoning_content_streamed_and_not(client) -> None:
    kw = dict(max_tokens=60, extra_body={"guided_choice": [THOUGHT]})
    msg = chat(client, **kw).choices[0].message
    assert msg.model_extra["reasoning_content"] == "\nThe user wants the weather.\n"
    assert msg.content == "It is sunny."
    fields, _, reason = streamed(client, **kw)
    assert fields == {"reasoning_content": "\nThe user wants the weather.\n",
                      "content": "It is sunny."} and reason == "stop"


def test_chat_template_kwargs_reach_the_template(client) -> None:
    on = chat(client, max_tokens=1).usage.prompt_tokens
    off = chat(client, max_tokens=1, extra_body={
        "chat_template_kwargs": {"enable_thinking": False}}).usage.prompt_tokens
    assert off > on  # the empty think block the template adds when thinking is off
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, extra_body={"chat_template_kwargs": {"tokenize": True}})
    assert e.value.body["param"] == "chat_template_kwargs"


# -- prompt logprobs --------------------------------------------------------------------------

PROMPT = "The quick brown fox jumps over the lazy dog. It was not amused, and neither was I."


@pytest.fixture(scope="module")
def hf_prompt_logprobs(tiny_dir, default_tokenizer):
    """(prompt ids, HF's log-softmax [P, V]: row i scores the token at i + 1)."""
    from transformers import AutoModelForCausalLM

    ids = default_tokenizer.encode(PROMPT)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return ids, torch.log_softmax(logits, -1).numpy()


@pytest.mark.parametrize("stream", [False, True])
def test_echo_returns_the_prompts_logprobs(client, hf_prompt_logprobs, stream) -> None:
    ids, ref = hf_prompt_logprobs
    r = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=1, temperature=0,
                                  echo=True, logprobs=1, stream=stream)
    chunks = list(r) if stream else [r]
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    lp = {"tokens": [], "token_logprobs": [], "top_logprobs": []}
    for ch in chunks:
        for key in lp:
            lp[key] += getattr(ch.choices[0].logprobs, key) if ch.choices else []
    assert text.startswith(PROMPT) and len(lp["tokens"]) == len(ids) + 1
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    want = [float(ref[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert lp["token_logprobs"][1:len(ids)] == pytest.approx(want, abs=1e-3)
    # The top alternative at each prompt position is HF's most likely token.
    for i in range(1, len(ids)):
        best = max(lp["top_logprobs"][i].values())
        assert best == pytest.approx(float(ref[i - 1].max()), abs=1e-3)


def test_generate_returns_input_logprobs_from_logprob_start_len(client, hf_prompt_logprobs):
    import httpx

    ids, ref = hf_prompt_logprobs
    url = str(client.base_url).removesuffix("/v1/")
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 2, "temperature": 0},
            "return_logprob": True, "logprob_start_len": 5, "top_logprobs_num": 2}
    meta = httpx.post(f"{url}/generate", json=body, timeout=120).json()["meta_info"]
    got = meta["input_token_logprobs"]
    assert [t for _, t, _ in got] == ids[5:]
    assert [lp for lp, _, _ in got] == pytest.approx(
        [float(ref[i - 1, ids[i]]) for i in range(5, len(ids))], abs=1e-3)
    assert [len(top) for top in meta["input_top_logprobs"]] == [2] * (len(ids) - 5)
    assert len(meta["output_token_logprobs"]) == 2


# -- lm-evaluation-harness ----------------------------------------------------------------------

MC_DOCS = [
    {"question": "The capital of France is", "choices": [" Paris", " Rome", " a fish"],
     "answer": 0},
    {"question": "Two plus two equals", "choices": [" four", " five"], "answer": 0},
    {"question": "The sky on a clear day is", "choices": [" blue", " green", " loud"],
     "answer": 0},
]


def test_lm_eval_loglikelihood_task_matches_its_hf_model(client, tiny_dir, tmp_path,
                                                         monkeypatch) -> None:
    # A multiple-choice task over local data (no hub), run through lm_eval's local-completions
    # model against the server (echo + logprobs) and through its HF model on the same weights.
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in MC_DOCS))
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n')
    tasks = TaskManager(include_path=str(tmp_path))

    def scores(model: str, args: dict) -> list[list[tuple[float, bool]]]:
        out = lm_eval.simple_evaluate(model=model, model_args=args, tasks=["tiny_mc"],
                                      task_manager=tasks, log_samples=True, batch_size=1)
        samples = sorted(out["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
        return [[tuple(r[0]) for r in s["resps"]] for s in samples]

    url = str(client.base_url).rstrip("/") + "/completions"
    served = scores("local-completions", {"model": NAME, "base_url": url,
                                          "tokenizer_backend": "huggingface",
                                          "tokenizer": str(tiny_dir)})
    hf = scores("hf", {"pretrained": str(tiny_dir), "dtype": "float32", "device": "cpu"})
    assert [len(s) for s in served] == [len(d["choices"]) for d in MC_DOCS]
    for got, want in zip(served, hf, strict=True):
        assert [g for g, _ in got] == pytest.approx([w for w, _ in want], abs=1e-3)
        assert [g for _, g in got] == [w for _, w in want]  # is_greedy
