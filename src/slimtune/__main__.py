"""`python -m slimtune ...` (what `accelerate launch -m slimtune ...` runs)."""
from .cli import main

main()
