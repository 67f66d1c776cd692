"""Drives imagegate with the official OpenAI Python SDK at its DEFAULT settings (two
retries, the SDK's own timeout), as a new user would, against a provider that fails once.

Usage: retries.py BASE_URL API_KEY. Prints one JSON line per call for the Rust test to check.
"""
import json
import sys
import time

from openai import OpenAI

base_url, api_key = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base_url, api_key=api_key)

for prompt in ["fails once with 500", "fails once with 429"]:
    started = time.monotonic()
    try:
        img = client.images.generate(model="gpt-image-1", prompt=prompt)
        outcome = {"ok": True, "images": len(img.data), "usage": img.usage.model_dump()}
    except Exception as err:
        outcome = {"ok": False, "error": type(err).__name__, "detail": str(err)}
    outcome["seconds"] = round(time.monotonic() - started, 3)
    print(json.dumps({"prompt": prompt, **outcome}), flush=True)
