"""Drives imagegate with the official OpenAI Python SDK at its DEFAULT retries, with a
timeout shorter than the provider takes, through a balancer that sends each connection to
the next replica in turn: its retries land on another replica than the try they repeat.

Usage: replicas.py BASE_URL API_KEY TIMEOUT_SECONDS. Prints one JSON line for the Rust test.
"""
import json
import sys
import time

from openai import OpenAI

base_url, api_key, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
client = OpenAI(base_url=base_url, api_key=api_key, timeout=timeout)

started = time.monotonic()
try:
    raw = client.images.with_raw_response.generate(model="gpt-image-1", prompt="a slow fox")
    img = raw.parse()
    outcome = {
        "ok": True,
        "images": len(img.data),
        "duplicate": raw.headers.get("x-imagegate-duplicate"),
        "retries": raw.retries_taken,
    }
except Exception as err:
    outcome = {"ok": False, "error": type(err).__name__, "detail": str(err)}
outcome["seconds"] = round(time.monotonic() - started, 3)
print(json.dumps(outcome), flush=True)
