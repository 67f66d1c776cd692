"""An edit as a key holder with a small budget sends it, with the SDK's defaults (retries on,
real timeouts): the SDK sends n, size and quality after model. Prints one JSON line per call."""
import json
import sys

import openai
from openai import OpenAI

base_url, key = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base_url, api_key=key)
png = b"\x89PNG\r\n\x1a\n" + b"\0" * 64


def edit(**fields):
    try:
        result = client.images.edit(
            model="gpt-image-2", image=("in.png", png, "image/png"), prompt="fox", **fields
        )
        return {"status": 200, "images": len(result.data)}
    except openai.APIStatusError as err:
        return {"status": err.status_code, "code": err.code}


print(json.dumps(edit(n=10, size="4096x4096", quality="high")))
print(json.dumps(edit(n=1, size="1024x1024", quality="low")))
