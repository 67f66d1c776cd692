"""Drives imagegate's async jobs (its own extension) with the official OpenAI Python SDK, as
the README shows: the header through extra_headers, the job through the generic client.get.

Usage: jobs.py BASE_URL API_KEY. Prints one JSON line per step for the Rust test to check.
"""
import json
import sys
import time

from openai import OpenAI

base_url, api_key = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0)


def report(name, **fields):
    print(json.dumps({"step": name, **fields}), flush=True)


def create(**headers):
    created = client.images.with_raw_response.generate(
        model="gpt-image-1", prompt="a red fox", size="1024x1024",
        extra_headers={"Prefer": "respond-async", **headers})
    return created.http_response.status_code, created.http_response.json()


status, job = create()
report("create", status=status, job=job)
# The header the SDK sends when it retries a request whose answer it lost.
status, again = create(**{"X-Stainless-Retry-Count": "1"})
report("retry", status=status, job=again)

deadline = time.time() + 20
while True:
    job = client.get(f"/images/jobs/{job['id']}", cast_to=object)
    if job["status"] in ("succeeded", "failed") or time.time() > deadline:
        break
    time.sleep(0.05)
report("collect", job=job)

sync = client.images.generate(model="gpt-image-1", prompt="a red fox", size="1024x1024")
report("sync", body=sync.model_dump(exclude_unset=True))
