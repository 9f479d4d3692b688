"""Stop sequences over streamed text deltas.

Generation stops as soon as the text produced so far contains a stop string: with `text` the
concatenation of all deltas, the matcher finds the shortest prefix of `text` that contains
any stop string and emits that prefix minus the stop string (when two stop strings end at the
same character, the longer one is cut). This depends only on the text, never on where the
token boundaries fell, so the same request stops at the same place however it is streamed.

Each stop string gets a Knuth-Morris-Pratt automaton whose state is the length of the
longest suffix of the text that is a prefix of that stop string. The largest state over all
stop strings is exactly the text that might still turn into a stop string, and is held back;
the rest is safe to send. The cost per character is amortised O(1) per stop string whatever
the strings look like.
"""

from collections.abc import Sequence


class _StopAutomaton:
    """KMP matcher for one stop string, fed one character at a time."""

    __slots__ = ("stop", "_failure", "matched")

    def __init__(self, stop: str) -> None:
        self.stop = stop
        # _failure[i]: length of the longest proper prefix of stop[: i + 1] that is also its suffix.
        failure = [0] * len(stop)
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = failure[k - 1]
            if stop[i] == stop[k]:
                k += 1
            failure[i] = k
        self._failure = failure
        self.matched = 0

    def step(self, char: str) -> bool:
        """Advance by one character; True when the stop string has just been completed."""
        stop, k = self.stop, self.matched
        while k and char != stop[k]:
            k = self._failure[k - 1]
        if char == stop[k]:
            k += 1
        if k == len(stop):
            self.matched = self._failure[k - 1]
            return True
        self.matched = k
        return False


class StopSequenceMatcher:
    """Cuts a stream of text deltas at the first stop string, holding back possible partial matches."""

    __slots__ = ("_automata", "_held", "_keep_stop", "stopped", "matched_stop")

    def __init__(self, stops: Sequence[str], keep_stop: bool = False) -> None:
        """`keep_stop`: the text ends after the stop string instead of before it (vLLM's
        include_stop_str_in_output)."""
        if any(not stop for stop in stops):
            raise ValueError("stop strings must be non-empty")
        self._automata = [_StopAutomaton(stop) for stop in dict.fromkeys(stops)]
        self._keep_stop = keep_stop
        self._held = ""
        self.stopped = False
        self.matched_stop: str | None = None

    def feed(self, delta: str) -> tuple[str, bool]:
        """Take the next text delta; return the text safe to emit now and whether a stop string was hit.

        Once stopped, the text from the stop string on is dropped and later deltas return ("", True).
        """
        if self.stopped:
            return "", True
        if not self._automata:
            return delta, False
        pending = self._held + delta
        offset = len(self._held)
        for i, char in enumerate(delta):
            completed = [automaton.stop for automaton in self._automata if automaton.step(char)]
            if completed:
                stop = max(completed, key=len)
                self.stopped = True
                self.matched_stop = stop
                self._held = ""
                return pending[: offset + i + 1 - (0 if self._keep_stop else len(stop))], True
        hold = max(automaton.matched for automaton in self._automata)
        self._held = pending[len(pending) - hold :]
        return pending[: len(pending) - hold], False

    def flush(self) -> str:
        """Release the held-back text when generation ends for another reason (length, EOS)."""
        held, self._held = self._held, ""
        return held
