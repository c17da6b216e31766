"""Training loops that change weights by gradient descent: healing (distillation towards a reference
model) now; router training and upcycling will share it.

Example:
    >>> from ffnkit.train.heal import HealConfig, heal_
    >>> report = heal_(model, reference, HealConfig(steps=100), tokenizer=tok)
"""
