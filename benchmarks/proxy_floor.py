"""The first-token time a client sees with no model at all: what Ray Serve's proxy and the network cost.

    python benchmarks/proxy_floor.py --concurrency 1,16 --requests-per-client 16
    python benchmarks/proxy_floor.py --chunks 14 --interval-s 0.025 --num-cpus 1

A model-free deployment answers `/v1/completions` as the CLLM server streams: its first event at once,
then `--chunks - 1` more, one per `--interval-s` (the defaults are the CLLM's shape at 16 clients on the
2-core machine: 64 tokens in ~14 passes of ~25 ms). The clients are `serve_load.py`'s (same closed loop,
same burst of first requests), so its TTFT columns compare directly: what the CLLM server adds beyond
these is its engine, and what these show is the floor that no engine change can lower.
"""

import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # serve_load
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import serve_load  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import StreamingResponse  # noqa: E402
from pydantic import Field  # noqa: E402
from ray import serve  # noqa: E402

from cllm.config import StageConfig, load_config  # noqa: E402


class FloorConfig(StageConfig):
    concurrency: list[int] = [1, 16]
    requests_per_client: int = Field(16, ge=1)
    chunks: int = Field(14, ge=1)  # events per answer, the first sent at once
    interval_s: float = Field(0.025, ge=0)  # between events
    num_cpus: float = Field(1.0, ge=0)


api = FastAPI()


@serve.deployment(max_ongoing_requests=128)
@serve.ingress(api)
class Paced:
    """Streams `chunks` one-token events `interval_s` apart, in the server's SSE shape."""

    def __init__(self, chunks: int, interval_s: float):
        self.chunks, self.interval_s = chunks, interval_s

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        await request.body()

        async def events():
            for i in range(self.chunks):
                if i:
                    await asyncio.sleep(self.interval_s)
                yield f"data: {json.dumps({'choices': [{'index': 0, 'text': 'x'}]})}\n\n"
            closing = {"choices": [], "usage": {"completion_tokens": self.chunks},
                       "jacobi_stats": {"forward_passes": self.chunks - 1}}
            yield f"data: {json.dumps(closing)}\n\ndata: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


def main(argv: list[str] | None = None) -> None:
    try:
        cfg = load_config(FloorConfig, sys.argv[1:] if argv is None else argv)
    except ValueError as err:
        sys.exit(f"error: {err}")
    import ray

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    port = serve_load.free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(Paced.options(ray_actor_options={"num_cpus": cfg.num_cpus}).bind(cfg.chunks, cfg.interval_s),
              name="paced", route_prefix="/paced")
    base = f"http://127.0.0.1:{port}/paced"
    load = serve_load.LoadConfig(requests_per_client=cfg.requests_per_client, max_tokens=cfg.chunks)
    try:
        asyncio.run(serve_load.warm_up(base, load, "paced", "warm-up"))
        rows = []
        for concurrency in cfg.concurrency:
            results, wall = asyncio.run(serve_load.run_load(base, load, "paced", ["-"], concurrency))
            rows.append({"concurrency": str(concurrency), "mode": "no model (paced)",
                         **serve_load.summarize(results, wall)})
        serve_load.print_table(rows)
    finally:
        serve_load.stop_servers()


if __name__ == "__main__":
    main()
