"""A genuine entropy collapse from the real model: the same prompts at temperature 1.0, then at 0.2.

vLLM reports raw (temperature-1) logprobs, so the drop is the model's own: at low temperature it stays on its most
likely paths, where it is confident, and answers alike. Drift, the collapse score and the diversity gauges must
all move the right way. Sizes are small for a CPU model; the detector settings are scaled down to match.
"""

import concurrent.futures as cf

import httpx
import pytest

from proxy.app import create_app
from proxy.settings import load_settings
from tests.plugins.servers import serve_in_thread

pytestmark = pytest.mark.vllm

PROMPTS = [
    "Write one sentence about the sea.",
    "Describe a cat in one sentence.",
    "Give me a fun fact about space.",
    "Say something about autumn.",
    "Tell me a short story opening.",
    "What is a good breakfast?",
]
PER_PHASE = 60


def _phase(url: str, temperature: float, seed0: int) -> None:
    def one(i: int) -> None:
        r = httpx.post(f"{url}/v1/chat/completions", timeout=300, json={
            "model": "smollm2", "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            "max_tokens": 32, "temperature": temperature, "seed": seed0 + i,
        })
        r.raise_for_status()

    with cf.ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(PER_PHASE)))


def _status(url: str) -> dict:
    import time

    for _ in range(100):  # let the background text worker catch up
        s = httpx.get(f"{url}/v1/entropy/status").json()
        if s["worker"]["queued"] == 0:
            return s["models"]["smollm2"]
        time.sleep(0.1)
    raise AssertionError("monitor worker did not drain")


def test_low_temperature_moves_drift_collapse_and_diversity(vllm_server, tmp_path):
    settings = load_settings({
        "upstream": vllm_server, "models": ["smollm2"], "audit.url": f"sqlite:///{tmp_path}/a.db",
        "monitors.window": 40, "monitors.baseline": 1200, "monitors.collapse_reference": 24,
    }, environ={})
    with serve_in_thread(create_app(settings)) as url:
        _phase(url, 1.0, 0)
        hot = _status(url)
        _phase(url, 0.2, 1000)
        cold = _status(url)
        metrics = httpx.get(f"{url}/metrics").text
    print(f"\nT=1.0: drift={hot['drift']} collapse={hot['collapse']['score']} "
          f"distinct_2={hot['diversity'].get('distinct_2')} chrf={hot['diversity'].get('chrf_distance')}")
    print(f"T=0.2: drift={cold['drift']} collapse={cold['collapse']['score']} "
          f"distinct_2={cold['diversity'].get('distinct_2')} chrf={cold['diversity'].get('chrf_distance')} "
          f"state={cold['state']}")
    assert hot["baseline"]["complete"]
    assert cold["drift"]["psi_tokens"] > hot["drift"]["psi_tokens"]
    assert cold["drift"]["js_tokens"] > hot["drift"]["js_tokens"]
    assert cold["collapse"]["score"] > hot["collapse"]["score"]
    assert cold["diversity"]["distinct_2"] < hot["diversity"]["distinct_2"]
    assert cold["diversity"]["chrf_distance"] < hot["diversity"]["chrf_distance"]
    assert 'entropy_proxy_entropy_drift{method="psi",model="smollm2"}' in metrics
