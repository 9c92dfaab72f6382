"""The benchmark's scenarios: traffic per simulated minute, events, and the pages each should and should not raise.

Traffic: ``RATE`` responses a simulated minute (about 300 tokens, 9,000 in a 30-minute window: above the alerts'
2,000-token guard), prompt classes of the recording at temperature 1.0 unless a scenario says otherwise. Times
are simulated minutes from the start of the scenario; ``fault`` is when the collapse is on (None: healthy).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from .simulate import Request, Tick

RATE = 4
CLASSES = ("code", "list", "story", "factual", "math")
ENTROPY_ALERTS = ("EntropyProxyEntropyCollapse", "EntropyProxyEntropyDrift", "EntropyProxyDiversityCollapse")
ALL_ALERTS = ENTROPY_ALERTS + ("EntropyProxyConfidentWrongRateHigh", "EntropyProxyLogprobsMissing",
                               "EntropyProxyUpstreamErrors")
DAY = 1440


@dataclass
class Scenario:
    name: str
    title: str
    minutes: int
    plan: Callable[[int, random.Random], Tick]
    expect: tuple[str, ...] = ()  # alerts that must fire during the fault (and keep firing while it lasts)
    fault: tuple[int, int] | None = None  # (start, end) simulated minutes
    replicas: int = 3
    staging: tuple[str, str] | None = None  # (revision, variant): pinned from a staging run before the deploy


def _healthy(m: int, rng: random.Random, variant: str = "normal", weights: dict[str, float] | None = None,
             rate: int = RATE) -> Tick:
    classes = list(weights) if weights else list(CLASSES)
    w = list(weights.values()) if weights else None
    return Tick([Request(variant, rng.choices(classes, w)[0]) for _ in range(rate)])


def _fault(start: int, end: int, variant: str) -> Callable[[int, random.Random], Tick]:
    def plan(m: int, rng: random.Random) -> Tick:
        return _healthy(m, rng, variant if start <= m < end else "normal")
    return plan


DAYTIME = {"code": 3, "factual": 3, "math": 2, "list": 1, "story": 1}
NIGHT = {"story": 4, "list": 3, "factual": 1, "code": 1, "math": 1}


def _mix(m: int, rng: random.Random) -> Tick:
    hour = (m // 60) % 24
    return _healthy(m, rng, weights=DAYTIME if 8 <= hour < 20 else NIGHT)


def _restarts(m: int, rng: random.Random) -> Tick:
    # From 4 h on (the automatic baseline exists), a replica restarts every 10 minutes, each every 30.
    tick = _healthy(m, rng)
    if m >= 240 and m % 10 == 0:
        tick.events.append(f"restart:{(m // 10) % 3}")
    return tick


def _quiet(m: int, rng: random.Random) -> Tick:
    if m < 240:
        return _healthy(m, rng)
    # Quiet hours: one confident (low-temperature) answer every 10 minutes, ~250 tokens in 30 minutes.
    return Tick([Request("low_temp", rng.choice(CLASSES))] if m % 10 == 0 else [])


def _slice(m: int, rng: random.Random) -> Tick:
    # Replica c takes only code questions (a client pinned to it); a and b the rest of the mix.
    reqs = []
    for _ in range(RATE):
        cls = rng.choice(CLASSES)
        reqs.append(Request("normal", cls, replica=2 if cls == "code" else rng.choice((0, 1))))
    return Tick(reqs)


def _revision(m: int, rng: random.Random) -> Tick:
    if m < DAY:
        return _healthy(m, rng)
    tick = _healthy(m, rng, "low_temp")
    if m == DAY:
        tick.events.append("revision:r2")
    return tick


def scenarios(smoke: bool = False) -> list[Scenario]:
    warm = 300  # the automatic baseline and full diversity windows exist by then
    if smoke:
        return [
            Scenario("healthy-steady", "healthy, steady mix (smoke)", 420, _healthy),
            Scenario("entropy-collapse", "genuine entropy collapse (smoke)", 420,
                     _fault(240, 420, "repeat"), expect=("EntropyProxyEntropyCollapse",), fault=(240, 420)),
        ]
    return [
        Scenario("healthy-steady", "healthy, steady mix of prompt classes", 720, _healthy),
        Scenario("mix-shift", "healthy, prompt-class mix shifting at 08:00 and 20:00, 36 h", DAY + 720, _mix),
        Scenario("restarts", "healthy; from 4 h on a replica restarts every 10 minutes (each every 30)", 840,
                 _restarts),
        Scenario("quiet-model", "busy 4 h, then quiet: one confident answer every 10 min", 900, _quiet),
        Scenario("replica-slice", "one replica of three sees only code questions", 720, _slice),
        Scenario("pinned-revision", "sharper revision (low temperature) deployed after a day, its baseline "
                 "pinned before the deploy from a staging run; 8 h of it", DAY + 480, _revision,
                 staging=("r2", "low_temp")),
        Scenario("entropy-collapse", "genuine entropy collapse (near-certain answers: counting, reciting) for "
                 "6 h, then recovery",
                 warm + 360 + 240, _fault(warm, warm + 360, "repeat"),
                 expect=("EntropyProxyEntropyCollapse",), fault=(warm, warm + 360)),
        Scenario("format-collapse", "every answer a fenced code block for 6 h (recorded ones), then recovery",
                 warm + 360 + 240, _fault(warm, warm + 360, "one_format"),
                 expect=("EntropyProxyDiversityCollapse",), fault=(warm, warm + 360)),
        Scenario("diversity-collapse", "greedy decoding: the same answer to the same prompt, 6 h, then recovery",
                 warm + 360 + 240, _fault(warm, warm + 360, "greedy"),
                 expect=("EntropyProxyDiversityCollapse",), fault=(warm, warm + 360)),
        Scenario("lasting-collapse", "entropy collapse that lasts 26 h, longer than the 1-day window",
                 warm + 1560, _fault(warm, warm + 1560, "repeat"),
                 expect=("EntropyProxyEntropyCollapse",), fault=(warm, warm + 1560)),
    ]
