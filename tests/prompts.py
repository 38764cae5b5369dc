"""Deterministic English prompts of varied lengths for end-to-end tests."""

import random

PLAIN = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at a temperature of",
    "A haiku about autumn leaves:",
]
CHAT = [
    "What is the tallest mountain in the world?",
    "Write a short poem about the moon.",
    "Explain photosynthesis in one sentence.",
    "List three fruits that are red.",
    "How many legs does a spider have?",
    "Translate 'good morning' into Spanish.",
]
_WORDS = (
    "river stone light garden engine window music letter forest city morning winter market bridge "
    "people paper silver ocean history science answer question quiet bright"
).split()


def varied_prompts(count: int, seed: int = 0, min_words: int = 3, max_words: int = 120) -> list[str]:
    rng = random.Random(seed)
    prompts = []
    for i in range(count):
        n = rng.randint(min_words, max_words)
        prompts.append(f"Story {i}: " + " ".join(rng.choice(_WORDS) for _ in range(n)) + ".")
    return prompts
