"""The OpenAPI 3.1 document served at /openapi.json."""
from dsocr.runtime.preprocess import MODE_NAMES


def _error():
    return {"description": "OpenAI-style error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def openapi_document(model_id: str) -> dict:
    part = {"oneOf": [
        {"type": "object", "required": ["type", "text"], "properties": {"type": {"enum": ["text", "input_text"]}, "text": {"type": "string"}}},
        {"type": "object", "required": ["type", "image_url"], "properties": {
            "type": {"enum": ["image_url", "input_image"]},
            "image_url": {"oneOf": [{"type": "string"}, {"type": "object", "required": ["url"], "properties": {"url": {"type": "string"}}}]}}},
        {"type": "object", "required": ["type", "file"], "description": "a PDF: each page is OCR'd on its own", "properties": {
            "type": {"const": "file"}, "file": {"type": "object", "required": ["file_data"], "properties": {
                "file_data": {"type": "string", "description": "data:application/pdf;base64,..."}, "filename": {"type": "string"}}}}},
        {"type": "object", "required": ["type"], "description": "a PDF (file_data, or an http(s) file_url)", "properties": {
            "type": {"const": "input_file"}, "file_data": {"type": "string"}, "file_url": {"type": "string"},
            "filename": {"type": "string"}}}]}
    message = {"type": "object", "required": ["role"], "properties": {
        "role": {"enum": ["system", "developer", "user", "assistant"]},
        "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": part}]}}}
    common = {"model": {"type": "string", "example": model_id}, "stream": {"type": "boolean"},
              "temperature": {"type": "number", "minimum": 0, "maximum": 2}, "top_p": {"type": "number", "minimum": 0, "maximum": 1},
              "top_k": {"type": "integer", "minimum": 0}, "seed": {"type": "integer", "minimum": 0},
              "no_repeat_ngram_size": {"type": "integer", "minimum": 0}, "ngram_window": {"type": "integer", "minimum": 1},
              "mode": {"enum": list(MODE_NAMES),
                       "description": "that mode's views, one the requested model has (absent: the server's "
                                      "configured views)"},
              "tools": {"type": "array", "maxItems": 0}, "tool_choice": {"const": "none"}}
    chat_req = {"type": "object", "required": ["model", "messages"], "properties": {
        **common, "messages": {"type": "array", "items": message}, "max_tokens": {"type": "integer", "minimum": 1},
        "max_completion_tokens": {"type": "integer", "minimum": 1},
        "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 4}]},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
        "n": {"const": 1}, "logprobs": {"const": False},
        "response_format": {"type": "object", "properties": {"type": {"const": "text"}}}}}
    resp_req = {"type": "object", "required": ["model", "input"], "properties": {
        **common, "input": {"type": "array", "items": message}, "instructions": {"type": "string"},
        "max_output_tokens": {"type": "integer", "minimum": 1},
        "text": {"type": "object", "properties": {"format": {"type": "object", "properties": {"type": {"const": "text"}}}}}}}
    errors = {code: _error() for code in ("400", "401", "404", "413", "500", "503")}
    sse = {"text/event-stream": {"schema": {"type": "string"}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "dsocr", "version": "0.1.0",
                 "description": "DeepSeek-OCR behind OpenAI-compatible routes: send images as image_url parts, "
                                "PDFs as file parts. Parameters it cannot honour (n > 1, logprobs, tools, "
                                "structured output) are a 400 with code unsupported_parameter."},
        "paths": {
            "/health": {"get": {"summary": "Liveness and queue state",
                                "responses": {"200": {"description": "ok", "content": {"application/json": {"schema": {"type": "object"}}}}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics: queue, slots, tokens, decode steps, latencies",
                                 "responses": {"200": {"description": "the Prometheus text format",
                                                       "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/v1/models": {"get": {"summary": "List the served model", "responses": {
                "200": {"description": "list", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ModelList"}}}}, **errors}}},
            "/v1/chat/completions": {"post": {
                "summary": "OCR through the chat completions API",
                "requestBody": {"required": True, "content": {"application/json": {"schema": chat_req}}},
                "responses": {"200": {"description": "chat.completion, or SSE chat.completion.chunk events ending in [DONE]",
                                      "content": {"application/json": {"schema": {"type": "object"}}, **sse}}, **errors}}},
            "/v1/responses": {"post": {
                "summary": "OCR through the responses API",
                "requestBody": {"required": True, "content": {"application/json": {"schema": resp_req}}},
                "responses": {"200": {"description": "response object, or SSE response.* events",
                                      "content": {"application/json": {"schema": {"type": "object"}}, **sse}}, **errors}}},
        },
        "components": {"schemas": {
            "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "object", "properties": {
                "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]}}}}},
            "ModelList": {"type": "object", "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": {
                "type": "object", "properties": {"id": {"type": "string"}, "object": {"const": "model"},
                                                 "created": {"type": "integer"}, "owned_by": {"type": "string"}}}}}},
        }},
    }
