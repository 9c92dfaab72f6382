"""Build ``bench/data/semantic_questions.jsonl``, the labelled question set of ``python -m bench.semantic``.

Every question has a short, unambiguous gold answer and names where the fact comes from:

- capitals: the ``countryinfo`` package (1.0.1, MIT; its data is the REST Countries data set), the most populous
  countries whose entry names one capital (countries with several seats of government are left out);
- chemical symbols: the ``periodictable`` package (2.1.0, public domain; IUPAC names and symbols), elements 1-100;
- arithmetic: generated here with a fixed seed (the answer is computed).

The file is committed; this script only documents how it was made and remakes it:
``pip install countryinfo==1.0.1 periodictable==2.1.0`` in a scratch environment, then
``python -m bench.semantic_questions``. Neither package is a dependency of the project.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).parent / "data" / "semantic_questions.jsonl"
N_CAPITALS = 130
N_ELEMENTS = 100
N_ADD = 50
N_MUL = 50
# Countries whose capital is disputed or split between cities: no single short gold answer.
SKIP = {"south africa", "bolivia", "netherlands", "israel", "palestine", "western sahara", "sri lanka",
        "benin", "cote d'ivoire", "ivory coast", "swaziland", "eswatini", "malaysia", "tanzania", "burundi",
        "nauru", "switzerland", "myanmar", "burma",
        # not sovereign states, or no longer one: the question would not have one answer
        "serbia and montenegro", "hong kong", "scotland", "puerto rico", "taiwan"}

# Other names of the same city in common English use (the data set's own spelling stays the gold answer).
# Kazakhstan's capital was renamed back to Astana in 2022; the data set still says Nur-Sultan.
ALIASES = {"Washington D.C.": ["Washington"], "Nur-Sultan": ["Astana"], "Kyiv": ["Kiev"], "Sana'a": ["Sanaa"],
           "Ulaanbaatar": ["Ulan Bator"], "Chișinău": ["Kishinev"]}


def capitals() -> list[dict[str, object]]:
    from countryinfo import all_countries  # type: ignore[import-not-found]

    rows = []
    for country in all_countries():
        try:
            info = country.info()
        except Exception:  # noqa: BLE001 - entries without data are skipped
            continue
        name, capital, pop = info.get("name"), info.get("capital"), info.get("population") or 0
        if not name or not capital or not isinstance(capital, str) or str(name).lower() in SKIP:
            continue
        rows.append((int(pop), str(name), capital))
    rows.sort(reverse=True)
    out = []
    for _pop, name, capital in rows[:N_CAPITALS]:
        out.append({"kind": "capital", "question": f"What is the capital of {name}?", "gold": capital,
                    "aliases": ALIASES.get(capital, []), "source": "countryinfo 1.0.1 (REST Countries data)"})
    return out


def elements() -> list[dict[str, object]]:
    import periodictable  # type: ignore[import-not-found]

    out = []
    for z in range(1, N_ELEMENTS + 1):
        el = periodictable.elements[z]
        out.append({"kind": "symbol", "question": f"What is the chemical symbol of {el.name}?", "gold": el.symbol,
                    "aliases": [], "source": "periodictable 2.1.0 (IUPAC element names and symbols)"})
    return out


def arithmetic(seed: int = 13) -> list[dict[str, object]]:
    rng = random.Random(seed)
    out = []
    pairs: list[tuple[int, int]] = []
    while len(pairs) < N_ADD:
        pair = (rng.randint(10, 99), rng.randint(10, 99))
        if pair not in pairs:
            pairs.append(pair)
    for a, b in pairs:
        out.append({"kind": "add", "question": f"What is {a} + {b}?", "gold": str(a + b), "aliases": [],
                    "source": f"generated (seed {seed})"})
    # Drawn without replacement, a <= b: no question twice, nor the same product asked both ways round.
    for a, b in rng.sample([(x, y) for x in range(2, 13) for y in range(x, 13)], N_MUL):
        out.append({"kind": "mul", "question": f"What is {a} times {b}?", "gold": str(a * b), "aliases": [],
                    "source": f"generated (seed {seed})"})
    return out


def main() -> None:
    rows = capitals() + elements() + arithmetic()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("w") as f:
        for i, r in enumerate(rows):
            f.write(json.dumps({"id": f"q{i:04d}", **r}, ensure_ascii=False) + "\n")
    print(f"{len(rows)} questions -> {OUT}")


if __name__ == "__main__":
    main()
