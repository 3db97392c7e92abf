"""Progress monitoring for RL: per-step statistics of the samples and aha-moment detection.

An aha moment (Infused Phi-2 card; DeepSeek-R1-Zero) is a sudden rise of thinking length or of
self-verification phrases. We flag a step when either statistic exceeds the mean of the previous `window`
steps by `rise` (relative) and by at least 3 standard deviations of that window, and log the step with
the sample that shows it best.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field

from thinkforge.formats import parse, words

VERIFY = re.compile(r"\b(wait|let me check|let me verify|double[- ]check|verify|re-?check|hmm)\b", re.IGNORECASE)


def verification_count(text: str) -> int:
    """Self-verification phrases in a text ("wait", "let me check", ...)."""
    return len(VERIFY.findall(text))


def sample_stats(texts: list[str]) -> dict:
    """Format rate, reasoning presence, thinking words and verification phrases over a step's samples."""
    parsed = [parse(t) for t in texts]
    n = max(1, len(texts))
    think = [words(p.thinking) for p in parsed]
    return {
        "format_rate": sum(p.format_ok for p in parsed) / n,
        "reasoning_rate": sum(w >= 5 for w in think) / n,
        "think_words": sum(think) / n,
        "verify_phrases": sum(verification_count(p.thinking) for p in parsed) / n,
        "response_words": sum(words(t) for t in texts) / n,
    }


@dataclass
class AhaDetector:
    window: int = 10
    rise: float = 0.3
    history: dict[str, list[float]] = field(default_factory=dict)

    def update(self, step: int, stats: dict, texts: list[str]) -> list[dict]:
        """Events for this step (possibly none); each names the statistic, its jump and an example sample."""
        events = []
        for key in ("think_words", "verify_phrases"):
            past = self.history.setdefault(key, [])
            value = stats[key]
            if len(past) >= self.window:
                recent = past[-self.window :]
                mean = statistics.fmean(recent)
                spread = statistics.pstdev(recent)
                if value > mean * (1 + self.rise) + 1e-9 and value > mean + 3 * spread and value > 0:
                    score = (lambda t: words(parse(t).thinking)) if key == "think_words" else verification_count
                    example = max(texts, key=score) if texts else ""
                    events.append({"event": "aha", "step": step, "statistic": key, "value": value,
                                   "previous_mean": round(mean, 4), "example": example})
            past.append(value)
        return events


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True, initial: int = 0):
    """A tqdm bar with ETA; redrawn at most every 10 s when stderr is not a terminal (logs stay small)."""
    import sys

    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True,
                mininterval=0.1 if interactive else 10.0)
