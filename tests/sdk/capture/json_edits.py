"""JSON edits sent with the OpenAI Python SDK. Its `images.edit` sends only multipart (3.52.0,
the pinned version, and 3.63.0, the newest when these were made): a JSON edit goes through
the client's own `post`, with the SDK's headers, retries and response types.

Usage: json_edits.py BASE_URL API_KEY (one request per call, in the order of run.sh's names)
"""
import sys

from openai import OpenAI, Stream
from openai.types import ImagesResponse
from openai.types.image_edit_stream_event import ImageEditStreamEvent

PNG_DATA_URL = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="

client = OpenAI(base_url=sys.argv[1], api_key=sys.argv[2], max_retries=0)

# Images by URL, one on the web and one inline.
img = client.post("/images/edits", cast_to=ImagesResponse, body={
    "model": "gpt-image-1",
    "prompt": "Add a watercolor effect to this image",
    "images": [{"image_url": "https://example.com/source-image.png"}, {"image_url": PNG_DATA_URL}],
    "size": "1024x1024",
    "quality": "high",
})
assert img.data[0].b64_json

# Images and mask by uploaded file id.
img = client.post("/images/edits", cast_to=ImagesResponse, body={
    "model": "gpt-image-1.5",
    "prompt": "Replace the background with a snowy mountain scene",
    "images": [{"file_id": "file-abc123"}, {"file_id": "file-def456"}],
    "mask": {"file_id": "file-mask123"},
    "output_format": "png",
    "output_compression": 100,
})
assert img.data[0].b64_json

# Streamed, with partial images.
events = list(client.post("/images/edits", cast_to=ImagesResponse, stream=True,
                          stream_cls=Stream[ImageEditStreamEvent], body={
    "model": "gpt-image-1",
    "prompt": "A red fox in the snow",
    "images": [{"image_url": "https://example.com/fox.png"}],
    "stream": True,
    "partial_images": 2,
}))
assert [e.type for e in events][-1] == "image_edit.completed", events
