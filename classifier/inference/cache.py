"""The same photo is classified once: the answers for the exact bytes of recent images, least recently used
first out. No model, no HTTP.

    bytes --key (BLAKE2b of the bytes + everything that can change the answer)--> probabilities, or the refusal

The key's context names the weights (a hash of them), backend, precision, JPEG_DRAFT, MAX_IMAGE_PIXELS and
the preprocessing, so an answer computed under other settings is never returned. A refused image (an
ImageError: 400, 413, 415) is kept too: its answer depends on nothing else either. Anything unexpected (a
500) is never kept. Entries are a kept answer each, about 4.3 KB (1000 float32 scores and the key).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import numpy as np

from classifier.inference.images import ImageError

ENTRY_BYTES = 1000 * 4 + 300  # the scores, the key and the dictionary's own share, for the sizing table


class ResultCache:
    def __init__(self, entries: int, context: str) -> None:
        self.capacity = entries
        self.context = context.encode()  # in every key: other weights or settings, other keys
        self.hits = self.misses = self.evictions = 0
        self._answers: OrderedDict[bytes, np.ndarray | ImageError] = OrderedDict()
        self._lock = threading.Lock()  # python -m classify's decode threads look up while its main thread stores

    def reset(self, context: str) -> None:
        """Forget every answer: from now on they are computed under `context` (a new model was loaded)."""
        with self._lock:
            self.context = context.encode()
            self._answers.clear()

    def __len__(self) -> int:
        return len(self._answers)

    def key(self, data: bytes) -> bytes:
        digest = hashlib.blake2b(data, digest_size=32)
        digest.update(self.context)
        return digest.digest()

    def get(self, key: bytes) -> np.ndarray | ImageError | None:
        """The answer kept for this key (now the most recently used), or None. (Whoever looks counts hits and
        misses: an image answered by an identical one's computation is a hit too.)"""
        with self._lock:
            answer = self._answers.get(key)
            if answer is None:
                return None
            self._answers.move_to_end(key)
        return answer if isinstance(answer, np.ndarray) else type(answer)(str(answer))  # a fresh exception

    def put(self, key: bytes, answer: np.ndarray | Exception) -> None:
        """Keep an answer (unexpected exceptions are not kept), dropping the least recently used past capacity."""
        if isinstance(answer, np.ndarray):
            answer = answer.copy()  # its own storage: not a view into a batch's output
        elif not isinstance(answer, ImageError):
            return
        with self._lock:
            self._answers[key] = answer
            self._answers.move_to_end(key)
            while len(self._answers) > self.capacity:
                self._answers.popitem(last=False)
                self.evictions += 1
