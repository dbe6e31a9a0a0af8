"""Structured output and tool calling through the clients people use, against a running wick
serving the default model (SmolLM2-135M-Instruct): the OpenAI Python SDK and huggingface_hub.

Usage: structured.py http://127.0.0.1:PORT   (scripts/client-check.sh starts the server)
"""

import json
import sys

from huggingface_hub import InferenceClient
from openai import OpenAI
from pydantic import BaseModel

url = sys.argv[1]
client = OpenAI(base_url=f"{url}/v1", api_key="-")


class City(BaseModel):
    city: str
    country: str
    population: int


# chat.completions.parse: a json_schema response format built from the pydantic model.
parsed = client.chat.completions.parse(
    model="wick",
    messages=[{"role": "user", "content": "Describe Paris: city, country and population."}],
    response_format=City,
    max_tokens=60,
    temperature=0,
)
city = parsed.choices[0].message.parsed
assert isinstance(city, City), parsed
assert parsed.choices[0].finish_reason == "stop", parsed
print("parse:", city)

# JSON mode.
out = client.chat.completions.create(
    model="wick",
    messages=[{"role": "user", "content": "Give me a JSON object describing Paris with keys city, country and population."}],
    response_format={"type": "json_object"},
    max_tokens=80,
    temperature=0,
)
assert out.choices[0].finish_reason == "stop", out
assert isinstance(json.loads(out.choices[0].message.content), dict), out
print("json_object:", out.choices[0].message.content)

tools = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather of a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city"],
            },
        },
    },
    {"type": "function", "function": {"name": "get_time", "description": "The time now"}},
]
messages = [{"role": "user", "content": "What is the weather in Paris?"}]
named = {"type": "function", "function": {"name": "get_weather"}}


def check_call(call, name=None):
    assert call.type == "function" and call.id, call
    assert call.function.name in ("get_weather", "get_time"), call
    if name:
        assert call.function.name == name, call
    args = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        assert isinstance(args["city"], str) and set(args) <= {"city", "unit"}, args
    else:
        assert args == {}, args


for choice in ["required", named, "auto"]:
    out = client.chat.completions.create(
        model="wick", messages=messages, tools=tools, tool_choice=choice,
        parallel_tool_calls=False, max_tokens=80, temperature=0,
    )
    c = out.choices[0]
    if c.message.tool_calls:
        assert c.finish_reason == "tool_calls" and c.message.content is None, out
        assert len(c.message.tool_calls) == 1, out
        check_call(c.message.tool_calls[0], "get_weather" if choice == named else None)
    else:
        assert choice == "auto" and c.message.content, out
    # The same request streamed: deltas put back together give the same answer.
    calls, content, finish = {}, "", None
    stream = client.chat.completions.create(
        model="wick", messages=messages, tools=tools, tool_choice=choice,
        parallel_tool_calls=False, max_tokens=80, temperature=0, stream=True,
    )
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for t in delta.tool_calls or []:
            entry = calls.setdefault(t.index, {"name": t.function.name, "arguments": ""})
            entry["arguments"] += t.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == c.finish_reason, (finish, out)
    if c.message.tool_calls:
        assert [calls[0]["name"]] == [c.message.tool_calls[0].function.name], calls
        assert json.loads(calls[0]["arguments"]) == json.loads(c.message.tool_calls[0].function.arguments)
    else:
        assert content == c.message.content, (content, out)
    print("tools", json.dumps(choice), c.finish_reason, c.message.tool_calls or c.message.content)

# A second turn: the call and its result go back through the chat template.
out = client.chat.completions.create(
    model="wick", max_tokens=40, temperature=0, tools=tools,
    messages=messages + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temperature\": 21}"},
    ],
)
assert out.choices[0].finish_reason in ("stop", "length", "tool_calls"), out
print("second turn:", out.choices[0].finish_reason)

hf = InferenceClient(url)
out = hf.chat_completion(messages=messages, tools=tools, tool_choice="required", max_tokens=60)
call = out.choices[0].message.tool_calls[0]
assert call.function.name in ("get_weather", "get_time"), out
print("huggingface_hub tools:", call.function.name, call.function.arguments)
text = hf.text_generation(
    "The capital of France is", max_new_tokens=20,
    grammar={"type": "regex", "value": " ?(Paris|Lyon|Nice)"},
)
# TGI's `/` (which the client calls) returns the prompt too for a text-generation model.
answer = text.removeprefix("The capital of France is").strip()
assert answer in ("Paris", "Lyon", "Nice"), text
print("huggingface_hub grammar:", repr(text))

# A refused stream is an HTTP 422 before any event: the client raises its ValidationError, as
# it does for TGI's in-band error event.
from huggingface_hub.errors import ValidationError
try:
    for _ in hf.text_generation("Hi", max_new_tokens=3, stream=True, temperature=-1.0):
        raise AssertionError("a token from a refused stream")
    raise AssertionError("a refused stream raised nothing")
except ValidationError as e:
    assert "temperature" in str(e), e
print("huggingface_hub refused stream: ValidationError")
print("all client checks passed")
