"""The RL curriculum (rl.curriculum): prompts come from one difficulty level of the task at a time, and the level
moves with the policy's rolling pass rate on it.

    pass rate = correct samples / graded samples over the most recent steps at the current level that together
                saw at least `window` groups (every group sampled, before the filters drop easy or all-wrong ones:
                a filtered group still says how hard the level is)
    up   when pass rate > up   (and a harder level is listed)
    down when pass rate < down (and an easier one is)

The window restarts after a move. The state is a pure function of the logged rows, so a resumed run rebuilds it
from metrics.jsonl (`replay`) and draws what the uninterrupted run drew.
"""

from __future__ import annotations

from collections import deque


class Curriculum:
    def __init__(self, levels: list[int], window: int, up: float, down: float):
        self.levels, self.window, self.up, self.down = sorted(set(levels)), window, up, down
        self.index = 0
        self.recent: deque[tuple[int, int, int]] = deque()  # (correct, graded, groups) per step at this level

    @property
    def level(self) -> int:
        return self.levels[self.index]

    def pass_rate(self) -> float | None:
        """The rolling pass rate, or None until `window` groups have been seen at this level."""
        correct = graded = groups = 0
        for c, g, n in reversed(self.recent):
            correct, graded, groups = correct + c, graded + g, groups + n
            if groups >= self.window:
                return correct / max(graded, 1)
        return None

    def update(self, correct: int, graded: int, groups: int) -> dict | None:
        """One step's counts at the current level; the move it causes ({"level", "from", "pass_rate"}), or None."""
        self.recent.append((correct, graded, groups))
        rate = self.pass_rate()
        if rate is None:
            return None
        while sum(n for *_, n in self.recent) - self.recent[0][2] >= self.window:  # keep just the window
            self.recent.popleft()
        step = 1 if rate > self.up and self.index + 1 < len(self.levels) else -1 if rate < self.down and self.index > 0 else 0
        if not step:
            return None
        before = self.level
        self.index += step
        self.recent.clear()
        return {"level": self.level, "from": before, "pass_rate": rate}

    def replay(self, rows: list[dict]) -> None:
        """Rebuild the state from a resumed run's logged steps (rows with the counts `update` took)."""
        for r in rows:
            if "curriculum_level" in r:
                self.update(int(r["correct_seen"]), int(r["graded"]), int(r["groups_seen"]))
