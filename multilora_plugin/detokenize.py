"""A request's output text, token by token: incremental detokenization and stop strings.

`text` only ever grows while a request runs: the last characters that could still be the start of
a stop string are held back until they are known not to be one, and a completed stop string is cut
off (never shown).
"""

from __future__ import annotations

from typing import Optional, Sequence


class Detokenizer:
    """Incremental decoding: the text that each new token adds to `decode(prompt + output)`.

    Decodes a short window (the tokens of the previous piece and the new ones) and emits the text
    past the previous piece, holding back while the window ends in an incomplete character."""

    CONTEXT = 5  # prompt tokens decoded with the first output tokens (leading spaces, merges)

    def __init__(self, tokenizer, prompt_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-self.CONTEXT:])
        self.prefix = 0  # window start
        self.read = len(self.ids)  # tokens before `read` were already turned into text

    def add(self, token: int) -> str:
        self.ids.append(token)
        if self.tokenizer is None:
            return ""
        before = self.tokenizer.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""


class OutputText:
    """The text of one request's output: decoded as tokens come, cut at the first stop string it
    completes, and reported only as far as no stop string can still begin."""

    def __init__(self, tokenizer, prompt_ids: Sequence[int], stop: Sequence[str] = ()) -> None:
        self._detokenizer = Detokenizer(tokenizer, prompt_ids)
        self._stop = tuple(stop)
        self._longest = max((len(s) for s in self._stop), default=0)
        self.text = ""  # decoded so far, a completed stop string cut
        self._before = 0  # len(text) before the last token
        self._sent = 0  # characters already reported

    def add(self, token: int) -> None:
        self._before = len(self.text)
        self.text += self._detokenizer.add(token)

    def cut_stop(self) -> Optional[str]:
        """The first stop string that the last token's text completed, cut off with what follows it;
        None if it completed none."""
        if not self._stop:
            return None
        start = max(0, self._before - self._longest + 1)
        hits = [(pos, s) for pos, s in ((self.text.find(s, start), s) for s in self._stop) if pos >= 0]
        if not hits:
            return None
        pos, stop = min(hits)
        self.text = self.text[:pos]
        return stop

    def report(self, finished: bool) -> tuple:
        """(the text to show now, what it adds to the text shown last time)."""
        visible = len(self.text)
        if not finished and self._stop:  # the end may still be the start of a stop string
            visible = max(self._sent, visible - self._longest + 1)
        shown, delta = self.text[:visible], self.text[self._sent:visible]
        self._sent = visible
        return shown, delta
