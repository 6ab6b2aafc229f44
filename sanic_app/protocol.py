"""OpenAI request bodies -> one OCR job, and the response objects and stream events back.

Conversations: DeepSeek-OCR is not a chat model, so the prompt is the system messages followed
by the last user turn; parts keep their order and each image becomes one `<image>` in place.
"""
from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field

from dsocr.runtime.engine import IMAGE_TOKEN as IMAGE_MARKER
from dsocr.runtime.generate import SamplingParams
from dsocr.sanic_app.errors import APIError

EXTRA_KEYS = ("no_repeat_ngram_size", "ngram_window", "mode")


@dataclass
class ParsedRequest:
    prompt: str
    image_refs: list[tuple[str, str]]          # (url, param path)
    sampling: SamplingParams
    mode: str
    messages_param: str                        # "messages" or "input": where the prompt came from
    stream: bool = False
    stop: list[str] = field(default_factory=list)
    include_usage: bool = False


def _bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


def _number(body: dict, key: str, kind, lo=None, hi=None, default=None):
    """body[key] as `kind` within [lo, hi]. Python's json reads NaN, Infinity, 1e400 (inf) and integers
    of any length: non-finite numbers are refused, and big integers are compared as integers."""
    v = body.get(key, None)
    if v is None:
        return default
    what = "an integer" if kind is int else "a number"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(f"'{key}' must be {what}", key)
    if isinstance(v, float) and not math.isfinite(v):
        raise _bad(f"'{key}' must be a finite number", key)
    if kind is int and isinstance(v, float):
        if not v.is_integer():
            raise _bad(f"'{key}' must be {what}", key)
        v = int(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise _bad(f"'{key}' must be between {lo} and {hi}" if hi is not None else f"'{key}' must be >= {lo}", key)
    return float(v) if kind is float else v


def _text(text: str, param: str) -> str:
    """Prompt text from a request. JSON's \\ud800 escapes give Python strings that UTF-8 (and so the
    tokenizer) cannot encode; an <image> in text would be taken for an image's place."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad("the text contains a lone surrogate (an unpaired \\ud800-\\udfff escape)", param) from None
    if IMAGE_MARKER in text:
        raise _bad(f"text must not contain {IMAGE_MARKER}: send images as image parts", param)
    return text


def _parts(content, param: str) -> list[tuple[str, str]]:
    """Message content -> [("text", s) | ("image", url)]."""
    if isinstance(content, str):
        return [("text", _text(content, param))]
    if not isinstance(content, list):
        raise _bad("message content must be a string or a list of parts", param)
    out = []
    for i, part in enumerate(content):
        p = f"{param}[{i}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise _bad("each content part must be an object with a 'type'", p)
        kind = part["type"]
        if kind in ("text", "input_text"):
            if not isinstance(part.get("text"), str):
                raise _bad(f"a {kind} part needs a string 'text'", p)
            out.append(("text", _text(part["text"], p)))
        elif kind in ("image_url", "input_image"):
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str):
                raise _bad(f"an {kind} part needs image_url as a string or {{\"url\": ...}}", p)
            out.append(("image", url))
        else:
            raise _bad(f"unsupported content part type {kind!r}", p)
    return out


def _prompt_from_messages(messages, param: str, system_extra: str | None = None) -> tuple[str, list[tuple[str, str]]]:
    if not isinstance(messages, list) or not messages:
        raise _bad(f"'{param}' must be a non-empty list of messages", param)
    systems, last_user = [], None
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            raise _bad("each message needs a role of system, developer, user or assistant", f"{param}[{i}]")
        if m["role"] in ("system", "developer"):
            systems += [t for k, t in _parts(m.get("content", ""), f"{param}[{i}].content") if k == "text"]
        elif m["role"] == "user":
            last_user = (i, m.get("content"))
    if last_user is None:
        raise _bad("the conversation has no user message", param)
    pieces, images = [], []
    for kind, value in _parts(last_user[1], f"{param}[{last_user[0]}].content"):
        if kind == "image":
            images.append((value, f"{param}[{last_user[0]}].content"))
            pieces.append(IMAGE_MARKER)
        else:
            pieces.append(value)
    if not images:
        raise _bad("an image is required: DeepSeek-OCR reads images (send an image_url part)", param)
    head = "\n".join(s for s in ([system_extra] if system_extra else []) + systems if s)
    prompt = "\n".join(p for p in pieces if p)
    return (head + "\n" + prompt if head else prompt), images


def _sampling(body: dict, defaults: dict, max_key: str | tuple[str, ...]) -> tuple[SamplingParams, str]:
    keys = (max_key,) if isinstance(max_key, str) else max_key
    max_new = defaults["max_new_tokens"]
    for k in keys:
        v = _number(body, k, int, 1, None)
        if v is not None:
            max_new = v
    ngram = _number(body, "no_repeat_ngram_size", int, 0, 1000, defaults["no_repeat_ngram_size"])
    seed = _number(body, "seed", int, 0, None, None if int(defaults["seed"]) < 0 else int(defaults["seed"]))
    mode = body.get("mode", defaults["mode"])
    if not isinstance(mode, str):
        raise _bad("'mode' must be a string", "mode")
    return SamplingParams(max_new_tokens=max_new, temperature=_number(body, "temperature", float, 0, 2, defaults["temperature"]),
                          top_p=_number(body, "top_p", float, 0, 1, defaults["top_p"]),
                          top_k=_number(body, "top_k", int, 0, None, defaults["top_k"]), seed=seed,
                          no_repeat_ngram_size=ngram, ngram_mode="window" if ngram else "off",
                          ngram_window=_number(body, "ngram_window", int, 1, 100000, defaults["ngram_window"])), mode


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise _bad("'stop' must be a string or a list of up to 4 non-empty strings", "stop")
    return stop


def _check_body(body) -> dict:
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    if not isinstance(body.get("stream", False), bool):
        raise _bad("'stream' must be a boolean", "stream")
    return body


def parse_chat(body, defaults: dict) -> ParsedRequest:
    body = _check_body(body)
    prompt, images = _prompt_from_messages(body.get("messages"), "messages")
    sampling, mode = _sampling(body, defaults, ("max_tokens", "max_completion_tokens"))
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise _bad("'stream_options' must be an object", "stream_options")
    return ParsedRequest(prompt, images, sampling, mode, "messages", body.get("stream", False), _stop(body),
                         bool(opts.get("include_usage", False)))


def parse_responses(body, defaults: dict) -> ParsedRequest:
    body = _check_body(body)
    inp, instructions = body.get("input"), body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise _bad("'instructions' must be a string", "instructions")
    if instructions is not None:
        _text(instructions, "instructions")
    if isinstance(inp, str):
        raise _bad("an image is required: DeepSeek-OCR reads images (send input as a message with an input_image part)",
                   "input")
    prompt, images = _prompt_from_messages(inp, "input", instructions)
    sampling, mode = _sampling(body, defaults, "max_output_tokens")
    return ParsedRequest(prompt, images, sampling, mode, "input", body.get("stream", False))


# ---------------------------------------------------------------- responses out

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}" if prefix == "chatcmpl" else f"{prefix}_{uuid.uuid4().hex[:24]}"


def chat_completion(rid: str, model: str, text: str, finish: str, usage: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                         "logprobs": None}],
            "usage": usage, "system_fingerprint": None}


def chat_chunk(rid: str, model: str, created: int, delta: dict | None, finish: str | None = None,
               usage: dict | None = None) -> dict:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
    out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices,
           "system_fingerprint": None}
    if usage is not None:
        out["usage"] = usage
    return out


def usage_chat(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response_object(rid: str, msg_id: str, model: str, text: str, status: str, usage: dict | None,
                    req: ParsedRequest, created: int) -> dict:
    content = [] if status == "in_progress" else [{"type": "output_text", "text": text, "annotations": []}]
    output = [] if status == "in_progress" else [{"type": "message", "id": msg_id, "status": "completed",
                                                  "role": "assistant", "content": content}]
    return {"id": rid, "object": "response", "created_at": created, "status": status, "model": model,
            "output": output, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": None, "metadata": {}, "parallel_tool_calls": False, "tool_choice": "none", "tools": [],
            "temperature": req.sampling.temperature, "top_p": req.sampling.top_p,
            "max_output_tokens": req.sampling.max_new_tokens, "usage": usage}


def usage_responses(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + completion_tokens}


class StopFilter:
    """Cuts the text at the first stop sequence; holds back a tail that could begin one, so a stream
    never shows part of a stop sequence."""

    def __init__(self, stops: list[str]):
        self.stops, self.buf, self.hit = stops, "", False
        self.hold = max((len(s) for s in stops), default=1) - 1

    def push(self, text: str) -> str:
        if self.hit:
            return ""
        self.buf += text
        cut = min((i for i in (self.buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.hit = True
            out, self.buf = self.buf[:cut], ""
            return out
        keep = len(self.buf) - self.hold if self.hold else len(self.buf)
        out, self.buf = self.buf[:max(keep, 0)], self.buf[max(keep, 0):]
        return out

    def flush(self) -> str:
        out, self.buf = ("" if self.hit else self.buf), ""
        return out
