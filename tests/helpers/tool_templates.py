"""Qwen2.5- and Mistral-style chat templates with tools, and a conversation that calls them.

The templates are modelled on the families' own ``tokenizer_config.json`` templates
(Qwen2.5-Instruct: the ``# Tools`` system block, ``<tool_call>`` blocks, tool results as
``<tool_response>`` inside one user turn; Mistral-7B-Instruct-v0.3: ``[AVAILABLE_TOOLS]``
before the last user turn, ``[TOOL_CALLS] [...]`` with 9-character ids, ``[TOOL_RESULTS]``),
shortened, with transformers' ``{% generation %}`` marker around what the assistant writes
so that transformers itself can compute the assistant mask the tests compare against.
For that marker to start after the generation prompt, Qwen's assistant branch writes the
``\n`` after ``<|im_start|>assistant`` first and the ``\n`` between content and calls
before each call; the text is the same as Qwen's for every turn with content or calls.
"""

import json
import string
from pathlib import Path

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers

EOS, BOS, PAD = "<|endoftext|>", "<s>", "<pad>"


def write_printable_tokenizer(directory) -> Path:
    """One token per printable ASCII character (JSON needs braces and quotes) plus the
    bos/eos/pad specials, in ``directory`` (tokenizer.json + tokenizer_config.json)."""
    directory = Path(directory)
    vocab = {EOS: 0, BOS: 1, PAD: 2, "<unk>": 3}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([EOS, BOS, PAD])
    tok.save(str(directory / "tokenizer.json"))
    config = {"eos_token": EOS, "bos_token": BOS, "pad_token": PAD}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


QWEN = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
    "{%- else %}{{- 'You are Qwen, a helpful assistant.' }}{%- endif %}"
    '{{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user '
    "query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:"
    '\\n<tools>" }}'
    '{%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}'
    '{{- "\\n</tools>\\n\\nFor each function call, return a json object with function name '
    'and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": '
    '<function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}'
    "{%- else %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
    "{%- for message in messages %}"
    '{%- if message.role == "user" or (message.role == "system" and not loop.first) %}'
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    '{%- elif message.role == "assistant" %}'
    "{{- '<|im_start|>assistant\\n' }}{% generation %}"
    "{%- if message.content %}{{- message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{%- if message.content or not loop.first %}{{- '\\n' }}{%- endif %}"
    '{{- \'<tool_call>\\n{"name": "\' }}{{- tool_call.name }}'
    "{{- '\", \"arguments\": ' }}{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}{% endgeneration %}"
    '{%- elif message.role == "tool" %}'
    '{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != "tool" %}'
    "{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
    '{%- if loop.last or messages[loop.index0 + 1].role != "tool" %}'
    "{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

MISTRAL = (
    '{%- if messages[0]["role"] == "system" %}'
    '{%- set system_message = messages[0]["content"] %}'
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- if not tools is defined %}{%- set tools = none %}{%- endif %}"
    '{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}'
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    '{%- if message["role"] == "user" %}'
    "{%- if tools is not none and (message == user_messages[-1]) %}"
    '{{- "[AVAILABLE_TOOLS] [" }}'
    "{%- for tool in tools %}{%- set tool = tool.function %}"
    '{{- \'{"type": "function", "function": {\' }}'
    '{%- for key, val in tool.items() if key != "return" %}'
    "{%- if val is string %}{{- '\"' + key + '\": \"' + val + '\"' }}"
    "{%- else %}{{- '\"' + key + '\": ' + val|tojson }}{%- endif %}"
    '{%- if not loop.last %}{{- ", " }}{%- endif %}'
    "{%- endfor %}"
    '{{- "}}" }}{%- if not loop.last %}{{- ", " }}{%- else %}{{- "]" }}{%- endif %}'
    "{%- endfor %}"
    '{{- "[/AVAILABLE_TOOLS]" }}'
    "{%- endif %}"
    "{%- if loop.last and system_message is defined %}"
    '{{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}'
    '{%- else %}{{- "[INST] " + message["content"] + "[/INST]" }}{%- endif %}'
    "{%- elif message.tool_calls is defined and message.tool_calls is not none %}"
    '{% generation %}{{- "[TOOL_CALLS] [" }}'
    "{%- for tool_call in message.tool_calls %}"
    "{%- set out = tool_call.function|tojson %}{{- out[:-1] }}"
    "{%- if not tool_call.id is defined or tool_call.id|length != 9 %}"
    '{{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}'
    "{%- endif %}"
    "{{- ', \"id\": \"' + tool_call.id + '\"}' }}"
    '{%- if not loop.last %}{{- ", " }}{%- else %}{{- "]" + eos_token }}{%- endif %}'
    "{%- endfor %}{% endgeneration %}"
    '{%- elif message["role"] == "assistant" %}'
    '{% generation %}{{- " " + message["content"]|trim + eos_token }}{% endgeneration %}'
    '{%- elif message["role"] == "tool" %}'
    '{{- \'[TOOL_RESULTS] {"content": \' + message.content|string + ", " }}'
    "{{- '\"call_id\": \"' + message.tool_call_id + '\"}[/TOOL_RESULTS]' }}"
    "{%- else %}"
    '{{- raise_exception("Only user, assistant and tool roles are supported!") }}'
    "{%- endif %}"
    "{%- endfor %}"
)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Current time in a time zone.",
            "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}},
        },
    },
]

CALLS = [
    {
        "id": "call00001",
        "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}},
    },
    {
        "id": "call00002",
        "type": "function",
        "function": {"name": "get_time", "arguments": {"tz": "UTC"}},
    },
]

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris, and the time in UTC?"},
    {"role": "assistant", "content": None, "tool_calls": CALLS},
    {"role": "tool", "tool_call_id": "call00001", "name": "get_weather", "content": '{"temp": 18}'},
    {"role": "tool", "tool_call_id": "call00002", "name": "get_time", "content": '"12:00"'},
    {"role": "assistant", "content": "18 C in Paris; 12:00 UTC."},
]  # fmt: skip
