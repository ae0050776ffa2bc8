"""The toy world: a character-level tokenizer, tiny Llama models, two tasks, SFT and preference pairs.

Built in code so the demo and the tests never download anything; see docs/toy.md. Import the submodules
(`tether.toy.tokenizer`, `.model`, `.tasks`, `.sft`, `.pairs`) directly; this package imports nothing.
"""
