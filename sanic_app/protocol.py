"""OpenAI request bodies -> one OCR job, and the response objects and stream events back.

Conversations: DeepSeek-OCR is not a chat model, so the prompt is the system messages followed
by the last user turn; parts keep their order and each image becomes one `<image>` in place. A
last user turn without an image (a chat UI's follow-up question) reads the conversation's latest
image, the last one in an earlier user turn; a conversation with no image at all is a 400
"image_required" (what chat UIs' background title and tag requests get). A PDF (data URL, file
part) is an image-like input whose pages images.py turns into OCR pages.

The request's views and decoding parameters come from the server's inference settings with the
request's values over them, through the settings' own `view` and `sampling` (cli/config.py), so
they are built as `dsocr ocr` builds them. Parameters the server cannot honour are refused with
a 400 naming them, not ignored.
"""
from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field

from dsocr.cli.config import Inference
from dsocr.runtime.engine import IMAGE_TOKEN as IMAGE_MARKER
from dsocr.runtime.errors import InputError
from dsocr.runtime.generate import SamplingParams
from dsocr.runtime.preprocess import Layout, ViewConfig
from dsocr.sanic_app.errors import APIError

IMAGE_PARTS = {"messages": "an image_url or file part", "input": "an input_image or input_file part"}   # per route

NO_TOOLS = "DeepSeek-OCR does not call tools"
NO_LOGPROBS = "this server does not return log probabilities"
TEXT_ONLY = 'the answer is the OCR text (only {"type": "text"})'
# What the server cannot honour: key -> (does this value ask for nothing the server lacks?, why not).
UNSUPPORTED = {
    "n": (lambda v: v is None or v == 1, "one choice per request ('n' must be 1)"),
    "logprobs": (lambda v: v is None or v is False, NO_LOGPROBS),
    "top_logprobs": (lambda v: v is None or v == 0, NO_LOGPROBS),
    "tools": (lambda v: v is None or v == [], NO_TOOLS),
    "tool_choice": (lambda v: v is None or v == "none", NO_TOOLS),
    "functions": (lambda v: v is None or v == [], NO_TOOLS),
    "function_call": (lambda v: v is None or v == "none", NO_TOOLS),
    "response_format": (lambda v: v is None or v == {"type": "text"}, TEXT_ONLY),
    "previous_response_id": (lambda v: v is None, "this server stores no responses (send the whole input)"),
}
CHAT_UNSUPPORTED = ("n", "logprobs", "top_logprobs", "tools", "tool_choice", "functions", "function_call",
                    "response_format")
RESPONSES_UNSUPPORTED = ("top_logprobs", "tools", "tool_choice", "previous_response_id")


@dataclass
class ParsedRequest:
    prompt: str
    image_refs: list[tuple[str, str]]          # (data: or http(s) URL of an image or PDF, param path)
    view: ViewConfig
    sampling: SamplingParams
    messages_param: str                        # "messages" or "input": where the prompt came from
    stream: bool = False
    stop: list[str] = field(default_factory=list)
    include_usage: bool = False
    instructions: str | None = None


def _bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


def _image_required(param: str) -> APIError:
    return APIError(400, f"an image is required: DeepSeek-OCR reads images and this conversation has none (send "
                         f"{IMAGE_PARTS[param]})", param, "image_required")


def _unsupported(key: str, why: str) -> APIError:
    return APIError(400, f"'{key}' is not supported: {why}", key, "unsupported_parameter")


def _refuse_unsupported(body: dict, keys: tuple[str, ...]) -> None:
    for key in keys:
        accepted, why = UNSUPPORTED[key]
        if not accepted(body.get(key)):
            raise _unsupported(key, why)


def _number(body: dict, key: str, kind, lo=None, hi=None):
    """body[key] as `kind` within [lo, hi], None when absent. Python's json reads NaN, Infinity, 1e400 (inf)
    and integers of any length: non-finite numbers are refused, and big integers are compared as integers."""
    v = body.get(key, None)
    if v is None:
        return None
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


def _file_url(part: dict, kind: str, param: str) -> str:
    """A file part's document as a URL: chat's {"type": "file", "file": {"file_data", "filename"}}, the
    responses API's {"type": "input_file", "file_data" or "file_url", "filename"}."""
    fields = part.get("file") if kind == "file" else part
    if not isinstance(fields, dict):
        raise _bad("a file part needs 'file' as an object with file_data", param)
    data = fields.get("file_data")
    url = fields.get("file_url") if kind == "input_file" else None       # chat's file parts have no URLs
    if data is not None:
        if not isinstance(data, str) or data[:5].lower() != "data:":
            raise _bad("file_data must be a data URL (data:application/pdf;base64,...)", param)
        return data
    if url is not None:
        if not isinstance(url, str):
            raise _bad("file_url must be a string", param)
        return url
    if fields.get("file_id") is not None:
        raise APIError(400, "file_id is not supported (this server keeps no files): send the file as file_data",
                       param, "unsupported_parameter")
    raise _bad("a file part needs file_data" if kind == "file" else "an input_file part needs file_data or file_url",
               param)


def _parts(content, param: str) -> list[tuple[str, str]]:
    """Message content -> [("text", s) | ("image", url of an image or PDF)]."""
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
        elif kind in ("file", "input_file"):
            out.append(("image", _file_url(part, kind, p)))
        else:
            raise _bad(f"unsupported content part type {kind!r}", p)
    return out


def _prompt_from_messages(messages, param: str, system_extra: str | None = None) -> tuple[str, list[tuple[str, str]]]:
    if not isinstance(messages, list) or not messages:
        raise _bad(f"'{param}' must be a non-empty list of messages", param)
    systems, users = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            raise _bad("each message needs a role of system, developer, user or assistant", f"{param}[{i}]")
        if m["role"] in ("system", "developer"):
            systems += [t for k, t in _parts(m.get("content", ""), f"{param}[{i}].content") if k == "text"]
        elif m["role"] == "user":
            users.append(i)
    if not users:
        raise _bad("the conversation has no user message", param)
    where = f"{param}[{users[-1]}].content"
    parts = _parts(messages[users[-1]].get("content"), where)
    images = [(value, where) for kind, value in parts if kind == "image"]
    pieces = [IMAGE_MARKER if kind == "image" else value for kind, value in parts]
    if not images:                      # a follow-up question: about the latest image of an earlier turn
        for i in reversed(users[:-1]):
            earlier = f"{param}[{i}].content"
            urls = [value for kind, value in _parts(messages[i].get("content"), earlier) if kind == "image"]
            if urls:
                images, pieces = [(urls[-1], earlier)], [IMAGE_MARKER] + pieces
                break
        else:
            raise _image_required(param)
    head = "\n".join(s for s in ([system_extra] if system_extra else []) + systems if s)
    prompt = "\n".join(p for p in pieces if p)
    return (head + "\n" + prompt if head else prompt), images


def _view_and_sampling(body: dict, defaults: Inference, layout: Layout,
                       max_keys: tuple[str, ...]) -> tuple[ViewConfig, SamplingParams]:
    """The request's views for the model of `layout` (its `mode`'s, else the server's configured ones) and
    decoding parameters (its values over the server's)."""
    max_new = None
    for k in max_keys:                   # the last one given wins
        max_new = _number(body, k, int, 1, None) or max_new
    mode = body.get("mode")
    if mode is not None and not isinstance(mode, str):
        raise _bad("'mode' must be a string", "mode")
    try:
        view = defaults.view(mode, layout=layout)
    except InputError as e:
        raise _bad(str(e), "mode") from None
    sampling = defaults.sampling(
        max_new_tokens=max_new, temperature=_number(body, "temperature", float, 0, 2),
        top_p=_number(body, "top_p", float, 0, 1), top_k=_number(body, "top_k", int, 0, None),
        seed=_number(body, "seed", int, 0, None), no_repeat_ngram_size=_number(body, "no_repeat_ngram_size", int, 0, 1000),
        ngram_window=_number(body, "ngram_window", int, 1, 100000))
    return view, sampling


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


def parse_chat(body, defaults: Inference | dict, layout: Layout) -> ParsedRequest:
    """`defaults`: the server's inference settings (an Inference, or its dict as load_settings merged it);
    `layout`: the requested model's (runtime.preprocess)."""
    body = _check_body(body)
    _refuse_unsupported(body, CHAT_UNSUPPORTED)
    prompt, images = _prompt_from_messages(body.get("messages"), "messages")
    view, sampling = _view_and_sampling(body, Inference.model_validate(defaults), layout,
                                        ("max_tokens", "max_completion_tokens"))
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise _bad("'stream_options' must be an object", "stream_options")
    return ParsedRequest(prompt, images, view, sampling, "messages", body.get("stream", False), _stop(body),
                         bool(opts.get("include_usage", False)))


def _text_format(body: dict) -> None:
    text = body.get("text")
    if text is None:
        return
    if not isinstance(text, dict):
        raise _bad("'text' must be an object", "text")
    if text.get("format") not in (None, {"type": "text"}):
        raise _unsupported("text.format", TEXT_ONLY)


def parse_responses(body, defaults: Inference | dict, layout: Layout) -> ParsedRequest:
    """`defaults`, `layout`: as parse_chat's."""
    body = _check_body(body)
    _refuse_unsupported(body, RESPONSES_UNSUPPORTED)
    _text_format(body)
    inp, instructions = body.get("input"), body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise _bad("'instructions' must be a string", "instructions")
    if instructions is not None:
        _text(instructions, "instructions")
    if isinstance(inp, str):
        raise _image_required("input")          # a bare string: text only
    prompt, images = _prompt_from_messages(inp, "input", instructions)
    view, sampling = _view_and_sampling(body, Inference.model_validate(defaults), layout, ("max_output_tokens",))
    return ParsedRequest(prompt, images, view, sampling, "input", body.get("stream", False),
                         instructions=instructions)


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
            "instructions": req.instructions, "metadata": {}, "parallel_tool_calls": False, "tool_choice": "none", "tools": [],
            "temperature": req.sampling.temperature, "top_p": req.sampling.top_p,
            "max_output_tokens": req.sampling.max_new_tokens, "usage": usage}


def usage_responses(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
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
