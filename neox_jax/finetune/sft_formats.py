"""The SFT record formats people bring, each brought to one of the two that are trained on.

Trained on as they are (``neox_jax.finetune.sft_data``):

* ``{"messages": [{"role", "content"}, ...], "tools"?: [...]}``: OpenAI's chat format. A
  ``content`` given as a list of parts (``[{"type": "text", "text": ...}, ...]``) becomes one
  text, the parts joined by newlines, as the server (``neox_jax.serving.protocol``) and vLLM
  join them, so a model is trained on what it will be served; a part that is not text is
  refused. OpenAI's ``"developer"`` role is the system role; an assistant message's
  ``"weight": 0`` keeps it out of the loss (``neox_jax.finetune.chat``). Other fields of a message
  (``name``, ...) go to the chat template, as transformers passes them.
* ``{"prompt": str, "completion": str}``.

Converted here:

* ShareGPT: ``{"conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...]}``
  (``"user"``/``"assistant"`` are accepted as ``from`` too), with LLaMA-Factory's optional
  ``"system"`` and ``"tools"`` (a JSON string) fields, becomes ``messages``; a turn's
  ``"weight": 0`` (as in OpenAI's format and axolotl's ShareGPT) keeps it out of the loss.
* Alpaca: ``{"instruction", "input"?, "output", "system"?}`` becomes a system turn (when
  given), one user turn (the instruction, then a blank line and the input when there is
  one) and one assistant turn (the output), rendered with the chat template; Databricks
  Dolly's ``{"instruction", "context", "response"}`` the same way.
* TRL's conversational prompt/completion: ``{"prompt": [messages], "completion":
  [messages]}`` becomes ``messages`` when the prompt holds no assistant turn (every
  assistant turn is trained on, so an assistant turn in the prompt would be too).

Anything else (preference pairs, plain ``text``, a ShareGPT speaker or content part that
is not understood) raises ``ChatFormatError`` naming the format and what to do, rather
than training on a guess. Null fields, as Arrow gives them for a field a record lacks,
count as absent.
"""

from __future__ import annotations

import json

from neox_jax.finetune.chat import ChatFormatError

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}  # fmt: skip


def _drop_nulls(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


def _text_parts(i: int, content: list) -> str:
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind != "text" or not isinstance(part.get("text"), str):
            raise ChatFormatError(
                f"message {i} content[{j}] is a {kind!r} part; SFT trains on text only: give "
                'content as a string or as {"type": "text", "text": "..."} parts.'
            )
        texts.append(part["text"])
    return "\n".join(texts)


def _openai_messages(messages) -> list:
    if not isinstance(messages, list):
        return messages  # validate_messages says what is wrong
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, dict):  # a null content stays: templates read it beside tool_calls
            m = {k: v for k, v in m.items() if v is not None or k == "content"}
            if isinstance(m.get("content"), list):
                m["content"] = _text_parts(i, m["content"])
            if m.get("role") == "developer":
                m["role"] = "system"
        out.append(m)
    return out


def _sharegpt(turns) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise ChatFormatError("ShareGPT 'conversations' must be a non-empty list of {from, value}.")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ChatFormatError(
                f"ShareGPT conversations[{i}] must be an object with 'from' and 'value'."
            )
        role = SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            raise ChatFormatError(
                f"ShareGPT conversations[{i}] is from {turn['from']!r}; the speakers understood "
                f"are {', '.join(SHAREGPT_ROLES)}. Convert other turns (tool calls, "
                "observations) to 'messages' with roles and tool_calls."
            )
        weight = {"weight": turn["weight"]} if turn.get("weight") is not None else {}
        messages.append({"role": role, "content": turn["value"], **weight})
    return messages


def _tools(tools):
    # LLaMA-Factory stores the tool schemas as one JSON string.
    if isinstance(tools, str):
        try:
            return json.loads(tools)
        except json.JSONDecodeError as e:
            raise ChatFormatError(f"'tools' is a string but not JSON ({e.msg}).") from None
    return tools


def _alpaca(rec: dict) -> list[dict]:
    if "response" in rec:  # Databricks Dolly: instruction, context, response
        rec = {**rec, "input": rec.get("context", ""), "output": rec["response"]}
    for key in ("instruction", "input", "output", "system"):
        if not isinstance(rec.get(key, ""), str):
            raise ChatFormatError(f"Alpaca field {key!r} must be a string.")
    if rec.get("history"):
        raise ChatFormatError(
            "Alpaca records with 'history' (earlier turns) are not read; give the conversation "
            "as 'messages' instead."
        )
    user = rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")
    system = [{"role": "system", "content": rec["system"]}] if rec.get("system") else []
    return [
        *system,
        {"role": "user", "content": user},
        {"role": "assistant", "content": rec["output"]},
    ]


def normalize_record(rec) -> dict:
    """``rec`` as ``{"messages", "tools"?}`` or ``{"prompt": str, "completion": str}``.

    Raises:
      ChatFormatError: a format that is not read (the message names it and the fix).
    """
    if not isinstance(rec, dict):
        raise ChatFormatError(f"expected a JSON object, got {type(rec).__name__}")
    rec = _drop_nulls(rec)
    if "messages" in rec:
        return {**rec, "messages": _openai_messages(rec["messages"])}
    if "conversations" in rec:
        messages = _sharegpt(rec["conversations"])
        if rec.get("system"):  # LLaMA-Factory's ShareGPT: the system prompt beside the turns
            if messages[0]["role"] == "system":
                raise ChatFormatError("ShareGPT record with a 'system' field and a system turn.")
            messages.insert(0, {"role": "system", "content": rec["system"]})
        return {"messages": messages, **({"tools": _tools(rec["tools"])} if "tools" in rec else {})}
    if "instruction" in rec and ("output" in rec or "response" in rec):
        return {"messages": _alpaca(rec)}
    if "prompt" in rec and "completion" in rec:
        prompt, completion = rec["prompt"], rec["completion"]
        if isinstance(prompt, list) and isinstance(completion, list):
            prompt, completion = _openai_messages(prompt), _openai_messages(completion)
            if any(isinstance(m, dict) and m.get("role") == "assistant" for m in prompt):
                raise ChatFormatError(
                    "a conversational prompt with assistant turns: every assistant turn is "
                    "trained on, so give the conversation as 'messages' (or keep earlier "
                    "answers out of the prompt)."
                )
            return {"messages": prompt + completion}
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ChatFormatError(
                "'prompt' and 'completion' must both be strings, or both lists of messages."
            )
        return rec
    if "chosen" in rec or "rejected" in rec:
        raise ChatFormatError(
            "a preference pair ('chosen'/'rejected') is data for DPO-style training, not SFT; "
            "train on the chosen answers as 'messages' or prompt/completion records."
        )
    raise ChatFormatError(
        f"record with fields {sorted(rec)} is in no SFT format read here: use 'messages' "
        "(OpenAI), 'prompt'+'completion', 'conversations' (ShareGPT) or "
        "'instruction'+'output' (Alpaca); plain 'text' is pretraining data (data.source=hf)."
    )
