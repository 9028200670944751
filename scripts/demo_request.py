"""Ask a running `multitalk serve` for a video, as any HTTP client would, and save it.

    python scripts/demo_request.py --server http://127.0.0.1:8000 --image examples/two_people.png \
        --audio examples/speaker1.wav --audio2 examples/speaker2.wav --out examples/server_video.mp4

Waits for the server to be ready, uploads the files through the fal upload flow
(`/storage/upload/initiate` + PUT), queues the request, prints its logs as they arrive, and
downloads the finished video. Only httpx is needed.
"""

from __future__ import annotations

import argparse
import mimetypes
import sys
import time
from pathlib import Path

import httpx

APP = "fal-ai/ai-avatar/multi"


def wait_ready(client: httpx.Client, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            response = client.get("/readyz")
            if response.status_code == 200:
                notice = response.json().get("notice")
                print(f"server ready{f' ({notice})' if notice else ''}")
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    sys.exit(f"the server at {client.base_url} was not ready after {timeout_s:g} s")


def upload(client: httpx.Client, path: Path) -> str:
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    initiated = client.post("/storage/upload/initiate", json={"file_name": path.name, "content_type": content_type})
    initiated.raise_for_status()
    urls = initiated.json()
    client.put(urls["upload_url"], content=path.read_bytes(), headers={"content-type": content_type}).raise_for_status()
    return urls["file_url"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", default="http://127.0.0.1:8000")
    parser.add_argument("--key", help="API key, when the server requires one")
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--audio", type=Path, required=True)
    parser.add_argument("--audio2", type=Path)
    parser.add_argument("--prompt", default="Two friends talk in a sunny room")
    parser.add_argument("--num-frames", type=int, default=181)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ready-timeout", type=float, default=600)
    args = parser.parse_args()

    headers = {"authorization": f"Key {args.key}"} if args.key else {}
    with httpx.Client(base_url=args.server, headers=headers, timeout=120) as client:
        wait_ready(client, args.ready_timeout)
        body = {"image_url": upload(client, args.image), "first_audio_url": upload(client, args.audio),
                "prompt": args.prompt, "num_frames": args.num_frames}
        if args.audio2:
            body["second_audio_url"] = upload(client, args.audio2)
        submitted = client.post(f"/queue/{APP}", json=body)
        if submitted.status_code != 200:
            sys.exit(f"refused ({submitted.status_code}): {submitted.text}")
        urls = submitted.json()
        print(f"queued {urls['request_id']}")
        seen = 0
        while True:
            status = client.get(urls["status_url"], params={"logs": 1}).json()
            for entry in (status["logs"] or [])[seen:]:
                print(f"  {entry['message']}")
            seen = len(status["logs"] or [])
            if status["status"] == "COMPLETED":
                break
            time.sleep(0.5)
        result = client.get(urls["response_url"])
        if result.status_code != 200:
            sys.exit(f"failed ({result.status_code}): {result.text}")
        video = result.json()["video"]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_bytes(client.get(video["url"]).raise_for_status().content)
        print(f"wrote {args.out} ({video['file_size']} bytes, seed {result.json()['seed']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
