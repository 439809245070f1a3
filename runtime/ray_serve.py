"""`onnxlm serve --ray`: the same server as a Ray Serve deployment, N replicas behind Ray's HTTP proxy.

Each replica builds its own app (artifact, engine thread, prefix cache) when Ray starts it: the builder below
runs on the replica, so nothing heavy is pickled. Ray's proxy routes requests across replicas; onnxlm writes no
load balancer of its own. Without an address a local Ray instance starts on loopback; `--ray-address auto` (or
ray://HOST:10001) joins an existing cluster, whose nodes must see the artifact's directory at the same path.
Install with `pip install "onnxlm[ray]"`.
"""

from __future__ import annotations

import os
from pathlib import Path

from onnxlm.errors import OnnxlmError
from onnxlm.runtime.engine import EngineConfig


def application(directory: Path, replicas: int, config: EngineConfig | None = None,
                model_name: str | None = None, threads: int | None = None):
    """The Ray Serve application: `replicas` copies of the onnxlm server, each built on its replica."""
    from ray import serve

    directory = Path(directory).resolve()
    name = model_name or directory.name

    def build():
        from onnxlm.api import load
        from onnxlm.runtime.server import create_app

        return create_app(load(directory, threads=threads), config, name)

    @serve.ingress(build)
    class OnnxlmServer:
        pass

    return serve.deployment(OnnxlmServer, name="onnxlm", num_replicas=replicas,
                            ray_actor_options={"num_cpus": 0}).bind()


def start(directory: Path, replicas: int, host: str = "127.0.0.1", port: int = 8000,
          config: EngineConfig | None = None, model_name: str | None = None, threads: int | None = None,
          address: str | None = None) -> None:
    """Connect to (or start, on loopback) a Ray instance and run the application behind Ray's HTTP proxy."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise OnnxlmError('--ray needs Ray Serve: pip install "onnxlm[ray]"') from None
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    if threads is None:  # each replica's ORT threads share the machine's cores
        threads = max(1, (os.cpu_count() or 1) // replicas)
    serve.run(application(directory, replicas, config, model_name, threads), name="onnxlm", route_prefix="/")


def stop() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
