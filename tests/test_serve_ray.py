"""`onnxlm serve --ray`: the server as a Ray Serve deployment with 2 replicas behind Ray's proxy, on a local Ray
instance on loopback that the test starts and stops."""

import socket

import pytest

from onnxlm.runtime.decoding import Decoding
from onnxlm.runtime.engine import EngineConfig

pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")


def test_two_replicas_serve_through_rays_proxy(tiny_artifact):
    from ray import serve

    from onnxlm.runtime import ray_serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray_serve.start(tiny_artifact.directory, 2, port=port, config=EngineConfig(slots=2, max_context=256),
                    model_name="tiny", threads=1)
    try:
        replicas = serve.status().applications["onnxlm"].deployments["onnxlm"].replica_states
        assert replicas == {"RUNNING": 2}
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        text = api.completions.create(model="tiny", prompt="fox", max_tokens=6, temperature=0).choices[0].text
        ids = tiny_artifact.tokenizer.encode("fox")
        eos = tiny_artifact.info.eos_token_ids
        expected = tiny_artifact.tokenizer.stream(
            t for t in tiny_artifact.generate_ids(ids, 6, decoding=Decoding()) if t not in eos)
        assert text == "".join(expected)
    finally:
        ray_serve.stop()
