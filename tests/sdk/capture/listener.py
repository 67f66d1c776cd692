"""A loopback listener that saves each request it receives byte for byte, as the captures in
tests/fixtures/captures were made, and answers like a provider (JSON, or events when the
request asked for a stream).

Usage: listener.py PORT OUT_DIR NAME...   Request i is saved as OUT_DIR/NAME_i.http; the
listener exits after the last name.
"""
import json
import socket
import sys

PNG_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
USAGE = {"total_tokens": 1889, "input_tokens": 1124, "output_tokens": 765,
         "input_tokens_details": {"text_tokens": 19, "image_tokens": 1105}}


def read_request(conn):
    raw = b""
    while b"\r\n\r\n" not in raw:
        chunk = conn.recv(65536)
        if not chunk:
            raise EOFError("connection closed before the headers ended")
        raw += chunk
    head, _, rest = raw.partition(b"\r\n\r\n")
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", ""):
        while not rest.endswith(b"0\r\n\r\n"):
            rest += conn.recv(65536)
        body = dechunk(rest)
    else:
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            rest += conn.recv(65536)
        body = rest
    return head + b"\r\n\r\n" + rest, body


def dechunk(raw):
    out = b""
    while True:
        size_line, _, raw = raw.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return out
        out += raw[:size]
        raw = raw[size + 2:]


def answer(body):
    try:
        request = json.loads(body)
    except ValueError:
        request = {}
    if request.get("stream") is True:
        events = []
        for i in range(int(request.get("partial_images") or 0)):
            event = {"type": "image_edit.partial_image", "b64_json": PNG_B64, "created_at": 1795251252,
                     "size": "1024x1024", "quality": "low", "background": "opaque",
                     "output_format": "png", "partial_image_index": i}
            events.append(f"event: image_edit.partial_image\ndata: {json.dumps(event)}\n\n")
        done = {"type": "image_edit.completed", "b64_json": PNG_B64, "created_at": 1795251252,
                "size": "1024x1024", "quality": "low", "background": "opaque",
                "output_format": "png", "usage": USAGE}
        events.append(f"event: image_edit.completed\ndata: {json.dumps(done)}\n\n")
        return "text/event-stream", "".join(events).encode()
    response = {"created": 1795251252, "background": "opaque", "data": [{"b64_json": PNG_B64}],
                "output_format": "png", "quality": "low", "size": "1024x1024", "usage": USAGE}
    return "application/json", json.dumps(response).encode()


def main():
    port, out_dir, names = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    server = socket.create_server(("127.0.0.1", port))
    for name in names:
        conn, _ = server.accept()
        with conn:
            raw, body = read_request(conn)
            with open(f"{out_dir}/{name}.http", "wb") as f:
                f.write(raw)
            content_type, payload = answer(body)
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: " + content_type.encode()
                + b"\r\nContent-Length: " + str(len(payload)).encode()
                + b"\r\nConnection: close\r\n\r\n" + payload
            )
        print(f"captured {name}", flush=True)


if __name__ == "__main__":
    main()
