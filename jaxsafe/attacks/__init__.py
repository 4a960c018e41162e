"""Red-teaming attacks on concept-erased text-to-image models (docs/attacks.md)."""
