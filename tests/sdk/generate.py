"""Drives imagegate with the official OpenAI Python SDK, as an internal service would.

Usage: generate.py BASE_URL API_KEY. Prints one JSON line per call for the Rust test to check.
"""
import base64
import json
import sys

from openai import OpenAI

base_url, api_key = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0)


def report(name, **fields):
    print(json.dumps({"call": name, **fields}), flush=True)


img = client.images.generate(model="gpt-image-1", prompt="a red fox", size="1024x1024", quality="low")
raw = base64.b64decode(img.data[0].b64_json)
report("generate", png=raw.startswith(b"\x89PNG"), usage=img.usage.model_dump())

# The provider behind gpt-image-2-all prefixes b64_json with a data URL; imagegate strips it.
img = client.images.generate(model="gpt-image-2-all", prompt="a blue fox")
raw = base64.b64decode(img.data[0].b64_json, validate=True)
report("generate_prefixed", png=raw.startswith(b"\x89PNG"))

events = list(client.images.generate(model="gpt-image-1", prompt="a green fox", stream=True))
report("stream", types=[e.type for e in events], usage=[e.usage.model_dump() for e in events if getattr(e, "usage", None)])

models = client.models.list()
report("models", ids=sorted(m.id for m in models))

try:
    client.images.generate(model="no-such-model", prompt="x")
except Exception as err:  # the SDK raises NotFoundError with the body's message
    report("unknown_model", error=type(err).__name__, status=getattr(err, "status_code", None))
